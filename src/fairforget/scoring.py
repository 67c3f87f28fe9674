"""Log-likelihood of continuations given prefixes, batched and computing vocabulary logits only where scored.

A request is ``(prefix, continuation)``. The prefix is tokenized with the tokenizer's special tokens (so a BOS
is added where the tokenizer adds one), the continuation without. When the prefix yields no token, the
sequence is conditioned on the tokenizer's BOS token, or its EOS token where it has no BOS (GPT-2 style),
so that the first continuation token is scored too. Sequences are right-padded: causal models never look
at later positions, so padding cannot change a score (for attention, Mamba and GPT-2 alike).

Models that share a body (a projection folded into the LM head changes only the head) can share its outputs:
inside :func:`reused_body_outputs`, a body with the weights of a :class:`BodyOutputs` store returns the stored
output for an input it has seen, so scoring the same items again runs only the head.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from fairforget import distributed
from fairforget.errors import FairforgetError
from fairforget.progress import progress


@dataclass(frozen=True)
class Encoded:
    """Token ids of one request and how many of them (the first ``n_prefix``) only condition."""

    ids: tuple[int, ...]
    n_prefix: int

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.n_prefix


@dataclass(frozen=True)
class Score:
    """Sum of log-probabilities of the continuation's tokens and their count."""

    logprob: float
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


def conditioning_token_id(tokenizer: Any) -> int:
    """The token an empty prefix is replaced by: BOS, else EOS."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise FairforgetError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token_id


def encode(tokenizer: Any, prefix: str, continuation: str) -> Encoded:
    """Tokenize one request; an empty prefix becomes the conditioning token."""
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if not prefix_ids:
        prefix_ids = [conditioning_token_id(tokenizer)]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont_ids:
        raise FairforgetError(f"continuation {continuation!r} has no tokens to score")
    return Encoded(tuple(prefix_ids) + tuple(cont_ids), len(prefix_ids))


def collate(batch: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` (True where a token is scored)."""
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, item in enumerate(batch):
        input_ids[row, : len(item.ids)] = torch.tensor(item.ids)
        attention_mask[row, : len(item.ids)] = 1
        target_mask[row, item.n_prefix: len(item.ids)] = True
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "target_mask": target_mask.to(device)}


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The model body (returning hidden states) and its LM head, also through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix, None)
    head = inner.get_output_embeddings()
    if body is None or head is None:
        raise FairforgetError(f"{type(inner).__name__} is not a causal LM with a body and an LM head")
    return body, head


def hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] from the model body (no vocabulary projection)."""
    body, _ = backbone_and_head(model)
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@dataclass
class BodyOutputs:
    """Outputs of one model body by input; ``fingerprint`` names its weights (None until a model is given)."""

    fingerprint: str | None = None
    outputs: dict[tuple, Any] = field(default_factory=dict)


def body_fingerprint(model: Any) -> str:
    """sha256 of the body's class, parameter and buffer names, dtypes, shapes and bytes."""
    body, _ = backbone_and_head(model)
    digest = hashlib.sha256(type(body).__name__.encode())
    for name, tensor in body.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype (bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _plain_call_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> tuple | None:
    """What a body call's output depends on (its tensors' bytes and its other arguments), or None for a call
    that reads or writes a cache: such a call always runs."""
    if kwargs.get("use_cache") or any(not isinstance(v, (torch.Tensor, bool, int, float, str, type(None)))
                                      for v in kwargs.values()):
        return None

    def part(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return str(value.dtype), tuple(value.shape), _raw_bytes(value)
        return value

    return part(input_ids), part(attention_mask), tuple(sorted((k, part(v)) for k, v in kwargs.items()))


@contextmanager
def reused_body_outputs(model: Any, store: BodyOutputs | None = None) -> Iterator[bool]:
    """Inside, when ``model``'s body has the weights of ``store`` (a new or empty store takes this model's),
    the body returns the stored output for an input it has seen and stores the others, so a model whose head
    alone differs is scored by its head only. Calls with a cache always run. Yields whether outputs are shared."""
    store = BodyOutputs() if store is None else store
    fingerprint = body_fingerprint(model)
    store.fingerprint = store.fingerprint or fingerprint
    if store.fingerprint != fingerprint:
        yield False
        return
    body, _ = backbone_and_head(model)
    original, own = body.forward, vars(body).get("forward")

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        key = _plain_call_key(input_ids, attention_mask, kwargs)
        if key is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if key not in store.outputs:
            store.outputs[key] = original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return store.outputs[key]

    body.forward = forward
    try:
        yield True
    finally:
        if own is None:
            del body.forward
        else:
            body.forward = own


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(token | earlier tokens) over ``target_mask`` and the count; differentiable.

    Vocabulary logits are computed only for the positions that predict a scored token.
    """
    _, head = backbone_and_head(model)
    hidden = hidden_states(model, input_ids, attention_mask)
    predicts = target_mask[:, 1:]
    rows = torch.nonzero(predicts, as_tuple=True)[0]
    logits = head(hidden[:, :-1][predicts]).float()
    targets = input_ids[:, 1:][predicts]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    sums = torch.zeros(input_ids.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    counts = predicts.sum(dim=1)
    return sums, counts


def check_lengths(model: Any, lengths: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Refuse a request longer than the model's own position limit (``max_position_embeddings`` where its
    config has one; a recurrent model has none), naming it: past the limit scores are meaningless."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for k, n in enumerate(lengths):
        if n > limit:
            raise FairforgetError(f"{_name(names, k, len(lengths))} is {n:,} tokens long, more than the model's "
                                  f"{limit:,} positions (max_position_embeddings); shorten it or leave it out")


def check_finite(values: Sequence[float], names: Sequence[str] | None = None) -> None:
    """Stop at the first non-finite score, naming its request: a NaN or infinite log-probability means the
    model's outputs overflowed and every number computed from them would be wrong."""
    for k, value in enumerate(values):
        if not math.isfinite(value):
            raise FairforgetError(f"{_name(names, k, len(values))} got a non-finite log-probability ({value}): the "
                                  f"model's outputs are NaN or infinite, so nothing was scored; check the model "
                                  f"(in float32: --dtype float32)")


def _name(names: Sequence[str] | None, k: int, n: int) -> str:
    return names[k] if names is not None else f"request {k + 1} of {n}"


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def score_encoded(model: Any, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 32,
                  device: torch.device | str | None = None, desc: str = "scoring",
                  names: Sequence[str] | None = None) -> list[Score]:
    """Scores of already-tokenized requests, in input order (a progress bar named ``desc`` when it lasts). A
    request past the model's position limit, or a non-finite score, raises naming it (``names``, else its
    number)."""
    if batch_size < 1:
        raise FairforgetError(f"batch size must be at least 1, got {batch_size}")
    check_lengths(model, [len(e.ids) for e in encoded], names)
    device = device or next(model.parameters()).device
    scores: list[Score | None] = [None] * len(encoded)
    done = []
    with torch.inference_mode():
        batches = distributed.my_batches(length_sorted_batches([len(e.ids) for e in encoded], batch_size))
        for batch_idx in progress(batches, desc=desc, unit="batch"):
            batch = collate([encoded[i] for i in batch_idx], pad_id, device)
            sums, counts = token_logprobs(model, **batch)
            done.append((batch_idx, (sums.tolist(), counts.tolist())))
    for batch_idx, (sums, counts) in distributed.gather_batches(done):
        for i, s, n in zip(batch_idx, sums, counts):
            scores[i] = Score(s, int(n))
    check_finite([s.logprob for s in scores], names)  # type: ignore[union-attr]
    return scores  # type: ignore[return-value]


def score_continuations(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                        device: torch.device | str | None = None, desc: str = "scoring",
                        names: Sequence[str] | None = None) -> list[Score]:
    """Log-likelihood of each continuation given its prefix, in input order (``names`` of the requests for
    errors; by default each continuation's start)."""
    encoded = [encode(tokenizer, prefix, continuation) for prefix, continuation in requests]
    names = names or [f"request {k + 1} ({c[:60]!r})" for k, (_, c) in enumerate(requests)]
    return score_encoded(model, encoded, tokenizer.pad_token_id, batch_size, device, desc, names)
