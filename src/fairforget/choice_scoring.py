"""Scoring the options of multiple-choice prompts, each prompt computed once and shared by its options.

Two modes:

* **letter**: the next-token distribution after the prompt, read at the option letters. A letter's
  probability is p("A") + p(" A"), the bare and the space-prefixed token together: after a plain
  "Answer:" a model writes " A", at the start of a chat assistant turn it writes "A", and summing both
  makes the score independent of that formatting. A variant that is not a single token is skipped.
* **answer**: the log-likelihood of each option text after the prompt, the prompt computed once per
  example. Attention models (Llama, GPT-2): one forward pass per row holding the prompt followed by all
  its options, with a 4-D attention mask (an option sees the prompt and its own earlier tokens, never
  another option) and position ids that restart each option at the prompt's end, so every option gets
  the inputs it would get alone, without copying a KV cache per option. Recurrent models (Mamba): the
  prompt runs once with the cache on (left-padded: masked pads leave the state at zero), the state is
  copied per option and the options are fed one token at a time (transformers' multi-token Mamba scan
  ignores a cached state). :func:`score_options_separately` scores each option as its own full
  sequence: the reference the shared computation is tested (equal within 1e-4) and benchmarked against.

For attention models both modes also share the **common preamble**: the longest token prefix that all
prompts of a call have in common (a chat template's system turn and the instruction, a third of a BBQ
prompt) runs once, and every batch continues from a copy of its key/value cache.

A prompt that already starts with the tokenizer's BOS text (a rendered chat template) is tokenized
without special tokens, so BOS is never doubled; other prompts get the tokenizer's special tokens.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fairforget import distributed
from fairforget.errors import FairforgetError
from fairforget.progress import progress
from fairforget.scoring import (Encoded, Score, backbone_and_head, check_finite, check_lengths, collate, encode,
                                length_sorted_batches, score_encoded)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt; special tokens are added unless the prompt already starts with BOS text."""
    bos = tokenizer.bos_token
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    if not ids:
        raise FairforgetError("a multiple-choice prompt has no tokens")
    return list(ids)


def encode_option(tokenizer: Any, option: str) -> list[int]:
    ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FairforgetError(f"option {option!r} has no tokens to score")
    return list(ids)


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[list[int]]:
    """For each letter, the single-token ids of ``letter`` and ``" " + letter``."""
    result = []
    for letter in letters:
        ids = sorted({tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for v in (letter, " " + letter)})
        single = [t[0] for t in ids if len(t) == 1]
        if not single:
            raise FairforgetError(f"option letter {letter!r} is not a single token of this tokenizer")
        result.append(single)
    flat = [t for ids in result for t in ids]
    if len(flat) != len(set(flat)):
        raise FairforgetError(f"option letters {list(letters)} share a token")
    return result


@dataclass
class Preamble:
    """The key/value cache of the token prefix shared by all prompts of a call (empty: ``length`` 0)."""

    length: int = 0
    cache: Any = None

    def for_batch(self, batch_size: int) -> Any:
        """A fresh copy of the cache repeated over the batch (the forward pass appends to it)."""
        if not self.length:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


def shared_preamble(model: Any, prompt_ids: Sequence[Sequence[int]], device: torch.device) -> Preamble:
    """Run the longest common token prefix of the prompts once (attention models), keeping each prompt
    at least one token of its own; recurrent models get an empty preamble."""
    body, _ = backbone_and_head(model)
    if _is_recurrent(body) or not prompt_ids:
        return Preamble()
    prefix = os.path.commonprefix([list(p) for p in prompt_ids])[: min(len(p) for p in prompt_ids) - 1]
    if not prefix:
        return Preamble()
    out = body(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    return Preamble(len(prefix), out.past_key_values)


def _last_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                   preamble: Preamble) -> torch.Tensor:
    """Log-softmax of the next-token logits after each prompt [batch, vocab] (right padding); the prompts'
    first ``preamble.length`` tokens come from its cache."""
    body, head = backbone_and_head(model)
    rest = [ids[preamble.length:] for ids in prompt_ids]
    batch = collate([Encoded(tuple(ids), len(ids)) for ids in rest], pad_id, device)
    mask = batch["attention_mask"]
    full_mask = torch.cat([mask.new_ones(len(rest), preamble.length), mask], dim=1)
    hidden = body(input_ids=batch["input_ids"], attention_mask=full_mask,
                  past_key_values=preamble.for_batch(len(rest)), use_cache=bool(preamble.length)).last_hidden_state
    last = mask.sum(dim=1) - 1
    return torch.log_softmax(head(hidden[torch.arange(len(rest), device=device), last]).float(), dim=-1)


def option_letter_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], letters: Sequence[str] = "ABC",
                           batch_size: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """log p(letter) of the next token after each prompt, over the whole vocabulary: [n_prompts, n_letters].

    Each letter's probability sums its bare and space-prefixed tokens. ``exp`` of a row sums to the
    probability mass the model puts on the valid letters.
    """
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    variants = letter_token_ids(tokenizer, letters)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    names = [f"prompt {k + 1} ({p[:60]!r})" for k, p in enumerate(prompts)]
    check_lengths(model, [len(e) for e in encoded], names)
    out = torch.empty(len(prompts), len(variants))
    done = []
    with torch.inference_mode():
        preamble = shared_preamble(model, encoded, device)
        batches = distributed.my_batches(length_sorted_batches([len(e) for e in encoded], batch_size))
        for idx in progress(batches, desc="scoring letters", unit="batch"):
            logprobs = _last_logprobs(model, [encoded[i] for i in idx], tokenizer.pad_token_id, device, preamble)
            columns = [torch.logsumexp(logprobs[:, ids], dim=-1) for ids in variants]
            done.append((idx, torch.stack(columns, dim=1).cpu()))
    for idx, rows in distributed.gather_batches(done):
        out[idx] = rows
    check_finite(out.sum(dim=1).tolist(), names)
    return out


def option_letter_probs(model: Any, tokenizer: Any, prompts: Sequence[str], letters: Sequence[str] = "ABC",
                        batch_size: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """The next-token distribution over the option letters, renormalised over them: [n_prompts, n_letters]."""
    return torch.softmax(option_letter_logprobs(model, tokenizer, prompts, letters, batch_size, device), dim=-1)


def _is_recurrent(body: Any) -> bool:
    """Whether the model body keeps a recurrent state (Mamba: ``cache_params``) rather than a KV cache."""
    return "cache_params" in inspect.signature(body.forward).parameters


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _split(scores: list[Score], option_ids: Sequence[Sequence[Any]]) -> list[list[Score]]:
    result, start = [], 0
    for opts in option_ids:
        result.append(scores[start: start + len(opts)])
        start += len(opts)
    return result


def _tree_batch(model: Any, prompt_ids: Sequence[Sequence[int]], option_ids: Sequence[Sequence[Sequence[int]]],
                pad_id: int, device: torch.device, preamble: Preamble, score_prompt: bool = False) -> list[list[Score]]:
    """Attention models: each row is a prompt followed by all its options, in one forward pass.

    A 4-D attention mask lets a prompt token see the preamble and the earlier prompt tokens, and an option
    token see the prompt and its own option's earlier tokens; each option's position ids continue from the
    prompt's end. Every option therefore gets exactly the attention inputs it would get as ``prompt +
    option`` alone, while the prompt is computed once (its first ``preamble.length`` tokens once per call).
    """
    body, head = backbone_and_head(model)
    skip = preamble.length
    rows, segments, positions, targets = [], [], [], []  # targets: (row, predicting position, token id)
    for r, (prompt, opts) in enumerate(zip(prompt_ids, option_ids)):
        ids = list(prompt[skip:])
        own = len(ids)  # the prompt's tokens after the preamble
        seg, pos = [0] * own, list(range(skip, len(prompt)))
        for k, opt in enumerate(opts, start=1):
            start = len(ids)
            targets += [(r, own - 1 if j == 0 else start + j - 1, t) for j, t in enumerate(opt)]
            ids += opt
            seg += [k] * len(opt)
            pos += range(len(prompt), len(prompt) + len(opt))
        rows.append(ids)
        segments.append(seg)
        positions.append(pos)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, s, p) in enumerate(zip(rows, segments, positions)):
        input_ids[i, : len(ids)], seg[i, : len(ids)], position_ids[i, : len(ids)] = (
            torch.tensor(ids), torch.tensor(s), torch.tensor(p))
    index = torch.arange(width)
    same_branch = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = (index[None, :, None] >= index[None, None, :]) & same_branch & (seg[:, None, :] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves only (no fully masked row)
    allowed = torch.cat([allowed.new_ones(len(rows), width, skip), allowed], dim=2)  # everyone sees the preamble
    dtype = head.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    hidden = body(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                  position_ids=position_ids.to(device), past_key_values=preamble.for_batch(len(rows)),
                  use_cache=bool(skip)).last_hidden_state
    n_options = len(targets)
    if score_prompt:  # the prompt's own tokens after its first, in the same head call
        targets += [(r, j - 1, prompt[j]) for r, prompt in enumerate(prompt_ids) for j in range(1, len(prompt))]
    t = torch.tensor(targets, device=device)
    picked = torch.log_softmax(head(hidden[t[:, 0], t[:, 1]]).float(), -1).gather(-1, t[:, 2:3]).squeeze(-1)
    lengths = [len(o) for opts in option_ids for o in opts]
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    sums = torch.zeros(len(lengths), dtype=picked.dtype, device=device).index_add(0, owner, picked[:n_options])
    prompt_sums = (torch.zeros(len(prompt_ids), dtype=picked.dtype, device=device).index_add(
        0, t[n_options:, 0], picked[n_options:]) if score_prompt else None)
    return _split(_option_scores(sums, lengths, prompt_ids, option_ids, prompt_sums), option_ids)


def _option_scores(sums: torch.Tensor, lengths: Sequence[int], prompt_ids: Sequence[Sequence[int]],
                   option_ids: Sequence[Sequence[Sequence[int]]], prompt_sums: torch.Tensor | None) -> list[Score]:
    """Each option's score; with ``prompt_sums`` (the log-probability of each prompt's tokens after its first),
    the score of prompt + option as one sequence."""
    if prompt_sums is None:
        return [Score(s, n) for s, n in zip(sums.tolist(), lengths)]
    rows = [r for r, opts in enumerate(option_ids) for _ in opts]
    sums = sums + prompt_sums[torch.tensor(rows, device=sums.device)]
    return [Score(s, n + len(prompt_ids[r]) - 1) for s, n, r in zip(sums.tolist(), lengths, rows)]


def _recurrent_batch(model: Any, prompt_ids: Sequence[Sequence[int]],
                     option_ids: Sequence[Sequence[Sequence[int]]], pad_id: int,
                     device: torch.device, preamble: Preamble, score_prompt: bool = False) -> list[list[Score]]:
    """Recurrent models (Mamba): the prompts run once with the cache on (left-padded: masked pads leave
    the state at zero), the state is copied per option, and the options are fed one token at a time.
    The preamble is always empty here (a multi-token Mamba step cannot start from a cached state)."""
    body, head = backbone_and_head(model)
    ids, mask = (t.to(device) for t in _pad(prompt_ids, pad_id, left=True))
    out = body(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out.cache_params
    first_logprobs = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), -1)
    owner = torch.tensor([p for p, opts in enumerate(option_ids) for _ in opts], device=device)
    cont, cont_mask = (t.to(device) for t in _pad([o for opts in option_ids for o in opts], pad_id, left=False))
    sums = first_logprobs[owner, cont[:, 0]]
    if cont.shape[1] > 1:
        cache.reorder_cache(owner)  # one copy of the state per option (index_select)
        hidden = torch.cat([body(input_ids=cont[:, t: t + 1], cache_params=cache, use_cache=True).last_hidden_state
                            for t in range(cont.shape[1] - 1)], dim=1)
        predicts = cont_mask[:, 1:].bool()
        rows = torch.nonzero(predicts, as_tuple=True)[0]
        picked = torch.log_softmax(head(hidden[predicts]).float(), -1).gather(-1, cont[:, 1:][predicts][:, None])
        sums = sums.index_add(0, rows, picked.squeeze(-1))
    prompt_sums = None
    if score_prompt:  # left-padded: prompt token j of row r sits at width - len + j, predicted one earlier
        width = ids.shape[1]
        at = [(r, width - len(p) + j, p[j]) for r, p in enumerate(prompt_ids) for j in range(1, len(p))]
        prompt_sums = torch.zeros(len(prompt_ids), device=device)
        if at:
            t = torch.tensor(at, device=device)
            logp = torch.log_softmax(head(out.last_hidden_state[t[:, 0], t[:, 1] - 1]).float(), -1)
            prompt_sums = prompt_sums.index_add(0, t[:, 0], logp.gather(-1, t[:, 2:3]).squeeze(-1))
    counts = [int(n) for n in cont_mask.sum(dim=1).tolist()]
    return _split(_option_scores(sums, counts, prompt_ids, option_ids, prompt_sums), option_ids)


def option_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]],
                    batch_size: int = 8, device: torch.device | str | None = None,
                    desc: str = "scoring options") -> list[list[Score]]:
    """Log-likelihood (sum and token count) of each option text after its prompt, the prompt computed once.

    ``options[i]`` are the continuations of ``prompts[i]`` (their leading spaces are the caller's choice);
    ``batch_size`` counts prompts. Results are in input order.
    """
    if len(prompts) != len(options):
        raise FairforgetError(f"{len(prompts)} prompts but {len(options)} option lists")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    option_ids = [[encode_option(tokenizer, o) for o in opts] for opts in options]
    return encoded_option_logprobs(model, prompt_ids, option_ids, tokenizer.pad_token_id, batch_size, device, desc)


def encoded_option_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]],
                            option_ids: Sequence[Sequence[Sequence[int]]], pad_id: int, batch_size: int = 8,
                            device: torch.device | str | None = None, desc: str = "scoring options",
                            names: Sequence[str] | None = None, score_prompt: bool = False) -> list[list[Score]]:
    """:func:`option_logprobs` on token ids already made: ``option_ids[i]`` continue ``prompt_ids[i]``; a row
    past the model's position limit or a non-finite score raises naming it (``names[i]``, else its number).
    With ``score_prompt`` each option's score is that of prompt + option as one sequence (the prompt's tokens
    after its first are scored too, once per prompt; no common preamble then)."""
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    if any(not p for p in prompt_ids) or any(not o for opts in option_ids for o in opts):
        raise FairforgetError("every prompt and option needs at least one token")
    check_lengths(model, [len(p) + max(map(len, opts), default=0) for p, opts in zip(prompt_ids, option_ids)], names)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_ids = [list(p) for p in prompt_ids]
    option_ids = [[list(o) for o in opts] for opts in option_ids]
    results: list[list[Score] | None] = [None] * len(prompt_ids)
    run_batch = _recurrent_batch if _is_recurrent(backbone_and_head(model)[0]) else _tree_batch
    done = []
    with torch.inference_mode():
        preamble = Preamble() if score_prompt else shared_preamble(model, prompt_ids, device)
        # grouped by row length (prompt + its options), which sets a batch's padded width
        rows = [len(p) + sum(len(o) for o in opts) for p, opts in zip(prompt_ids, option_ids)]
        batches = distributed.my_batches(length_sorted_batches(rows, batch_size))
        for idx in progress(batches, desc=desc, unit="batch"):
            done.append((idx, run_batch(model, [prompt_ids[i] for i in idx], [option_ids[i] for i in idx],
                                        pad_id, device, preamble, score_prompt)))
    for idx, scores in distributed.gather_batches(done):
        for i, s in zip(idx, scores):
            results[i] = s
    check_finite([sum(s.logprob for s in row) for row in results], names)  # type: ignore[union-attr]
    return results  # type: ignore[return-value]


def sentence_group_ids(tokenizer: Any, group: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The token ids the sentences of ``group`` share at their start (the conditioning token first; each
    sentence keeps a token of its own) and each sentence's remaining ids."""
    ids = [encode(tokenizer, "", sentence).ids for sentence in group]
    shared = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
    return list(ids[0][:shared]), [list(i[shared:]) for i in ids]


def score_sentence_groups(model: Any, tokenizer: Any, groups: Sequence[Sequence[str]], batch_size: int = 32,
                          desc: str = "scoring", names: Sequence[Sequence[str]] | None = None) -> list[list[Score]]:
    """Each sentence's log-likelihood as :func:`~fairforget.scoring.score_continuations` gives it for
    ``("", sentence)`` (every token, the first conditioned on BOS, else EOS), the tokens the sentences of a
    group share at their start computed once: they are the prompt, each sentence's remaining tokens an option
    (``score_prompt``). ``batch_size`` counts sentences; ``names`` (one per sentence, grouped alike) name a
    sentence past the model's positions or a group with a non-finite score."""
    prompts, options = zip(*(sentence_group_ids(tokenizer, group) for group in groups)) if groups else ((), ())
    flat_names = [n for group in names for n in group] if names is not None else None
    check_lengths(model, [len(p) + len(o) for p, opts in zip(prompts, options) for o in opts], flat_names)
    per_batch = max(1, batch_size // max((len(g) for g in groups), default=1))
    return encoded_option_logprobs(model, prompts, options, tokenizer.pad_token_id, per_batch, desc=desc,
                                   names=[" / ".join(group) for group in names] if names is not None else None,
                                   score_prompt=True)


def score_options_separately(model: Any, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]],
                             batch_size: int = 24, device: torch.device | str | None = None) -> list[list[Score]]:
    """Reference for :func:`option_logprobs`: each (prompt, option) as its own full sequence, the same tokens.

    ``batch_size`` counts sequences here.
    """
    encoded = []
    for prompt, opts in zip(prompts, options):
        prompt_ids = tuple(encode_prompt(tokenizer, prompt))
        encoded += [Encoded(prompt_ids + tuple(encode_option(tokenizer, o)), len(prompt_ids)) for o in opts]
    return _split(score_encoded(model, encoded, tokenizer.pad_token_id, batch_size, device), options)
