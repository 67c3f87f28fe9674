"""Scoring the options of multiple-choice prompts, each prompt computed once and shared by its options.

Two modes:

* **letter**: the next-token distribution after the prompt, read at the option letters. A letter's
  probability is p("A") + p(" A"), the bare and the space-prefixed token together: after a plain
  "Answer:" a model writes " A", at the start of a chat assistant turn it writes "A", and summing both
  makes the score independent of that formatting. A variant that is not a single token is skipped.
* **answer**: the log-likelihood of each option text after the prompt. The prompt runs once with the
  cache on and every option continues from that cached state: attention models (Llama, GPT-2) get
  right-padded prompts and continuations placed, by position ids and attention mask, right after each
  prompt's real tokens; recurrent models (Mamba) get left-padded prompts (masked pads leave the state at
  zero) and the options fed one token at a time (transformers' multi-token Mamba scan ignores the cached
  state). :func:`score_options_separately` scores each option as its own full sequence, the reference
  the shared computation is tested and benchmarked against.

A prompt that already starts with the tokenizer's BOS text (a rendered chat template) is tokenized
without special tokens, so BOS is never doubled; other prompts get the tokenizer's special tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from .errors import FairforgetError
from .scoring import Encoded, Score, backbone_and_head, collate, hidden_states, length_sorted_batches, score_encoded


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


def _last_logprobs(model: Any, prompt_ids: Sequence[Sequence[int]], pad_id: int,
                   device: torch.device) -> torch.Tensor:
    """Log-softmax of the next-token logits after each prompt [batch, vocab] (right padding)."""
    _, head = backbone_and_head(model)
    batch = collate([Encoded(tuple(ids), len(ids)) for ids in prompt_ids], pad_id, device)
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    last = batch["attention_mask"].sum(dim=1) - 1
    return torch.log_softmax(head(hidden[torch.arange(len(prompt_ids), device=device), last]).float(), dim=-1)


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
    out = torch.empty(len(prompts), len(variants))
    with torch.inference_mode():
        for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
            logprobs = _last_logprobs(model, [encoded[i] for i in idx], tokenizer.pad_token_id, device)
            columns = [torch.logsumexp(logprobs[:, ids], dim=-1) for ids in variants]
            out[idx] = torch.stack(columns, dim=1).cpu()
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


def _shared_batch(model: Any, prompt_ids: Sequence[Sequence[int]], option_ids: Sequence[Sequence[Sequence[int]]],
                  pad_id: int, device: torch.device) -> list[list[Score]]:
    """Scores of every option of a batch of prompts, each prompt run once and its cache shared."""
    body, head = backbone_and_head(model)
    recurrent = _is_recurrent(body)
    ids, mask = (t.to(device) for t in _pad(prompt_ids, pad_id, left=recurrent))
    lengths = mask.sum(dim=1)
    out = body(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out.cache_params if recurrent else out.past_key_values
    last = torch.full_like(lengths, ids.shape[1] - 1) if recurrent else lengths - 1
    first_logprobs = torch.log_softmax(head(out.last_hidden_state[torch.arange(len(ids), device=device), last]).float(), -1)

    owner = torch.tensor([p for p, opts in enumerate(option_ids) for _ in opts], device=device)
    flat = [o for opts in option_ids for o in opts]
    cont, cont_mask = (t.to(device) for t in _pad(flat, pad_id, left=False))
    sums = first_logprobs[owner, cont[:, 0]]
    if cont.shape[1] > 1:
        cache.reorder_cache(owner)  # one row of cached state per option (index_select)
        feed = cont[:, :-1]  # the last token of an option predicts nothing that is scored
        if recurrent:
            hidden = torch.cat([body(input_ids=feed[:, t: t + 1], cache_params=cache, use_cache=True).last_hidden_state
                                for t in range(feed.shape[1])], dim=1)
        else:
            positions = lengths[owner, None] + torch.arange(feed.shape[1], device=device)
            attention = torch.cat([mask[owner], cont_mask[:, :-1]], dim=1)
            hidden = body(input_ids=feed, attention_mask=attention, position_ids=positions, past_key_values=cache,
                          use_cache=True).last_hidden_state
        predicts = cont_mask[:, 1:].bool()
        rows = torch.nonzero(predicts, as_tuple=True)[0]
        picked = torch.log_softmax(head(hidden[predicts]).float(), -1).gather(-1, cont[:, 1:][predicts][:, None])
        sums = sums.index_add(0, rows, picked.squeeze(-1))
    counts = cont_mask.sum(dim=1)
    scores = [Score(s, int(n)) for s, n in zip(sums.tolist(), counts.tolist())]
    result, start = [], 0
    for opts in option_ids:
        result.append(scores[start: start + len(opts)])
        start += len(opts)
    return result


def option_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]],
                    batch_size: int = 8, device: torch.device | str | None = None) -> list[list[Score]]:
    """Log-likelihood (sum and token count) of each option text after its prompt, the prompt computed once.

    ``options[i]`` are the continuations of ``prompts[i]`` (their leading spaces are the caller's choice);
    ``batch_size`` counts prompts. Results are in input order.
    """
    if len(prompts) != len(options):
        raise FairforgetError(f"{len(prompts)} prompts but {len(options)} option lists")
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    option_ids = [[encode_option(tokenizer, o) for o in opts] for opts in options]
    results: list[list[Score] | None] = [None] * len(prompts)
    with torch.inference_mode():
        for idx in length_sorted_batches([len(p) for p in prompt_ids], batch_size):
            scores = _shared_batch(model, [prompt_ids[i] for i in idx], [option_ids[i] for i in idx],
                                   tokenizer.pad_token_id, device)
            for i, s in zip(idx, scores):
                results[i] = s
    return results  # type: ignore[return-value]


def score_options_separately(model: Any, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]],
                             batch_size: int = 24, device: torch.device | str | None = None) -> list[list[Score]]:
    """Reference for :func:`option_logprobs`: each (prompt, option) as its own full sequence, the same tokens.

    ``batch_size`` counts sequences here.
    """
    encoded = []
    for prompt, opts in zip(prompts, options):
        prompt_ids = tuple(encode_prompt(tokenizer, prompt))
        encoded += [Encoded(prompt_ids + tuple(encode_option(tokenizer, o)), len(prompt_ids)) for o in opts]
    flat = score_encoded(model, encoded, tokenizer.pad_token_id, batch_size, device)
    result, start = [], 0
    for opts in options:
        result.append(flat[start: start + len(opts)])
        start += len(opts)
    return result
