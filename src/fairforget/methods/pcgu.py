"""Partitioned Contrastive Gradient Unlearning (Yu et al., Findings ACL 2023) for causal LMs.

For a batch of pairs (x_a, x_d) differing only in the group term, with f(x) the mean log-likelihood of the
scored tokens of x (each sentence conditioned on the BOS/EOS token; which tokens are scored is
``target_tokens``: ``all``, only the ``differing`` span, the differing span and everything ``differing_after``
it, or only what comes ``after`` it, the part a causal LM reads conditioned on the group term):

1. g_a = grad sum_batch m_i f(x_a) and g_d = grad sum_batch m_i f(x_d) (two backward passes; m_i = 1, except
   with the ``dynamic`` direction, where m_i = +1 if the model now prefers x_a and -1 otherwise);
2. every weight with >= 2 dimensions is split into partitions along one axis: ``rows`` (input aggregation,
   one partition per output neuron, per token for embeddings) or ``columns`` (one per input feature);
   every 1-D tensor is one partition;
3. c_p = cosine(g_a[p], g_d[p]) per partition, computed per tensor in one vectorised operation; a partition
   where either gradient is zero (or absent), or whose cosine is not below ``min_cos`` when given, is never
   selected;
4. the k partitions with the lowest cosine are updated by plain SGD: ``advantaged``: theta_p -= lr g_a[p]
   (lower the advantaged sentence); ``disadvantaged``: theta_p += lr g_d[p]; ``both`` and ``dynamic``:
   theta_p += lr (g_d[p] - g_a[p]); with m_i this is the reference's dynamic direction, which lowers in every
   pair the side the model currently prefers and raises the other (the lowest cos(g_a, g_d) is the highest
   cosine between the two update components m g_d and -m g_a); ``dynamic_lower``: only the side the model
   currently prefers in each pair is lowered (theta_p -= lr grad f(preferred)).
5. Optionally a retain term R on neutral text (KL from the start model's next-token distribution, or the LM
   loss) is applied on the same step to every trainable parameter: theta -= lr w grad R. KL is zero, with
   zero gradient, at the start model.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from fairforget.errors import FairforgetError
from fairforget.scoring import (Encoded, backbone_and_head, collate, encode, hidden_states, score_encoded,
                                token_logprobs)

Aggregation = Literal["rows", "columns"]
Direction = Literal["advantaged", "disadvantaged", "both", "dynamic", "dynamic_lower"]
TargetTokens = Literal["all", "differing", "differing_after", "after"]
DIRECTIONS = ("advantaged", "disadvantaged", "both", "dynamic", "dynamic_lower")
TARGET_TOKENS = ("all", "differing", "differing_after", "after")


@dataclass(frozen=True)
class PartitionedTensor:
    """A trainable tensor and how it is partitioned: each index along ``axis`` is one partition (None: whole)."""

    name: str
    param: torch.nn.Parameter
    axis: int | None

    @property
    def n_partitions(self) -> int:
        return 1 if self.axis is None else self.param.shape[self.axis]

    @property
    def module_type(self) -> str:
        """The leaf module's name (``q_proj``, ``embed_tokens``, ``norm``...), or the parameter's own name."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) > 1 else parts[-1]

    @property
    def layer(self) -> str:
        """The layer index in the parameter name (``layers.3`` -> ``3``), or ``none``."""
        match = re.search(r"\.(\d+)\.", f".{self.name}.")
        return match[1] if match else "none"


def _output_axis(module: Any, param_name: str) -> int:
    """The axis indexing output features: 1 for GPT-2's transposed ``Conv1D`` weights, 0 otherwise."""
    from transformers.pytorch_utils import Conv1D

    return 1 if isinstance(module, Conv1D) and param_name == "weight" else 0


def partition_tensors(model: Any, aggregation: Aggregation = "rows") -> list[PartitionedTensor]:
    """Every trainable parameter (shared ones once) with its partition axis."""
    if aggregation not in ("rows", "columns"):
        raise FairforgetError(f"unknown aggregation {aggregation!r}: use rows or columns")
    tensors, seen = [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() < 2:
                axis = None
            else:
                out_axis = _output_axis(module, param_name)
                axis = out_axis if aggregation == "rows" else 1 - out_axis
            tensors.append(PartitionedTensor(name, param, axis))
    if not tensors:
        raise FairforgetError("the model has no trainable parameters to partition")
    return tensors


def _as_rows(tensor: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View a tensor as [partitions, elements per partition]."""
    return tensor.reshape(1, -1) if axis is None else tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def partition_cosines(g_a: torch.Tensor | None, g_d: torch.Tensor | None, axis: int | None,
                      n_partitions: int) -> torch.Tensor:
    """Cosine between the two gradients per partition; +inf where either gradient is zero or absent."""
    if g_a is None or g_d is None:
        return torch.full((n_partitions,), float("inf"))
    a, d = _as_rows(g_a.float(), axis), _as_rows(g_d.float(), axis)
    dot = torch.linalg.vecdot(a, d)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(d, dim=1)
    cosine = dot / norms
    return torch.where(norms > 0, cosine, torch.full_like(cosine, float("inf"))).cpu()


def select_lowest(cosines: Sequence[torch.Tensor], k: int, min_cos: float | None = None) -> list[torch.Tensor]:
    """Indices, per tensor, of the ``k`` partitions with the lowest cosine over all tensors (never +inf; with
    ``min_cos``, only partitions whose cosine is below it, e.g. 0 for negative cosines only)."""
    flat = torch.cat(list(cosines))
    if min_cos is not None:
        flat = torch.where(flat < min_cos, flat, torch.full_like(flat, float("inf")))
    k = min(k, int(torch.isfinite(flat).sum()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    return [mask.nonzero().squeeze(1) for mask in torch.split(chosen, [c.numel() for c in cosines])]


def apply_update(tensor: PartitionedTensor, grad: torch.Tensor, rows: torch.Tensor, step: float) -> None:
    """theta[p] += step * grad[p] for the selected partitions ``rows`` of one tensor; nothing else changes."""
    if rows.numel() == 0:
        return
    with torch.no_grad():
        if tensor.axis is None:
            tensor.param.add_(grad.to(tensor.param.dtype), alpha=step)
        else:
            index = rows.to(tensor.param.device)
            tensor.param.index_add_(tensor.axis, index, grad.index_select(tensor.axis, index).to(tensor.param.dtype),
                                    alpha=step)


def sequence_scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """f(x) per row: the mean log-likelihood of the scored tokens (differentiable)."""
    sums, counts = token_logprobs(model, **batch)
    return sums / counts.clamp(min=1)


def gradients(model: Any, tensors: Sequence[PartitionedTensor], batch: dict[str, torch.Tensor],
              signs: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(f per row, grad of sum_i signs_i f_i per tensor; signs default 1); the gradients are taken from ``.grad``,
    which is left as None."""
    for t in tensors:
        t.param.grad = None
    scores = sequence_scores(model, batch)
    (scores if signs is None else scores * signs.to(scores.device, scores.dtype)).sum().backward()
    grads = []
    for t in tensors:
        grads.append(t.param.grad)
        t.param.grad = None
    return scores.detach(), grads


@dataclass
class StepResult:
    """What one PCGU step did: the batch's objective values (before the update) and what it selected."""

    f_adv: list[float]
    f_dis: list[float]
    lowered: list[str]  # per pair, which side was lowered ("adv" or "dis")
    selected: list[int]  # per tensor, partitions updated
    n_candidates: int  # partitions with a defined cosine
    min_selected_cosine: float = float("nan")
    max_selected_cosine: float = float("nan")
    by_module: dict[str, int] = field(default_factory=dict)
    by_layer: dict[str, int] = field(default_factory=dict)
    retain_loss: float = float("nan")


def _preferences(model: Any, adv: Sequence[Encoded], dis: Sequence[Encoded], pad_id: int,
                 device: Any) -> list[bool]:
    """Per pair, whether the model now scores the advantaged side at least as high as the other."""
    with torch.no_grad():
        f_a0 = sequence_scores(model, collate(adv, pad_id, device))
        f_d0 = sequence_scores(model, collate(dis, pad_id, device))
    return [a >= d for a, d in zip(f_a0.tolist(), f_d0.tolist())]


def pcgu_step(model: Any, tensors: Sequence[PartitionedTensor], adv: Sequence[Encoded], dis: Sequence[Encoded],
              pad_id: int, k: int, lr: float, direction: Direction = "advantaged", min_cos: float | None = None,
              retain: "RetainTerm | None" = None, retain_weight: float = 0.0) -> StepResult:
    """One PCGU update on a batch of pairs (``adv[i]``, ``dis[i]``); see the module docstring."""
    if len(adv) != len(dis) or not adv:
        raise FairforgetError(f"a PCGU batch needs equal, non-zero numbers of pairs, got {len(adv)} and {len(dis)}")
    if direction not in DIRECTIONS:
        raise FairforgetError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    device = tensors[0].param.device
    lowered = ["adv"] * len(adv)
    first, second, signs = list(adv), list(dis), None
    if direction == "dynamic_lower":
        lowered = ["adv" if p else "dis" for p in _preferences(model, adv, dis, pad_id, device)]
        first = [a if side == "adv" else d for a, d, side in zip(adv, dis, lowered)]
        second = [d if side == "adv" else a for a, d, side in zip(adv, dis, lowered)]
    elif direction == "dynamic":
        lowered = ["adv" if p else "dis" for p in _preferences(model, adv, dis, pad_id, device)]
        signs = torch.tensor([1.0 if side == "adv" else -1.0 for side in lowered])
    elif direction == "disadvantaged":
        lowered = ["none"] * len(adv)
    f_first, g_first = gradients(model, tensors, collate(first, pad_id, device), signs)
    f_second, g_second = gradients(model, tensors, collate(second, pad_id, device), signs)
    g_retain = retain.gradients(model, tensors) if retain is not None and retain_weight > 0 else None
    cosines = [partition_cosines(ga, gd, t.axis, t.n_partitions) for t, ga, gd in zip(tensors, g_first, g_second)]
    chosen = select_lowest(cosines, k, min_cos)
    for i, (t, rows, ga, gd) in enumerate(zip(tensors, chosen, g_first, g_second)):
        if direction == "disadvantaged":
            grad = gd
        elif direction in ("both", "dynamic"):
            grad = None if ga is None or gd is None else ga - gd
        else:
            grad = ga
        if grad is not None:
            apply_update(t, grad, rows, +lr if direction == "disadvantaged" else -lr)
        if g_retain is not None and g_retain[i] is not None:
            with torch.no_grad():
                t.param.add_(g_retain[i].to(t.param.dtype), alpha=-lr * retain_weight)
    if direction == "dynamic_lower":
        f_adv = [fl if side == "adv" else fk for fl, fk, side in zip(f_first.tolist(), f_second.tolist(), lowered)]
        f_dis = [fk if side == "adv" else fl for fl, fk, side in zip(f_first.tolist(), f_second.tolist(), lowered)]
    else:
        f_adv, f_dis = f_first.tolist(), f_second.tolist()
    picked = torch.cat([c[r] for c, r in zip(cosines, chosen)])
    by_module, by_layer = Counter(), Counter()
    for t, rows in zip(tensors, chosen):
        by_module[t.module_type] += rows.numel()
        by_layer[t.layer] += rows.numel()
    return StepResult(f_adv, f_dis, lowered, [r.numel() for r in chosen],
                      int(sum(torch.isfinite(c).sum() for c in cosines)),
                      float(picked.min()) if picked.numel() else float("nan"),
                      float(picked.max()) if picked.numel() else float("nan"),
                      dict(by_module), dict(by_layer),
                      retain.last_value if g_retain is not None else float("nan"))


class RetainTerm:
    """A loss on neutral text that keeps the model near its start, cycled over ``texts`` in fixed batches.

    ``kl``: mean over tokens of KL(p_start || p_model) of the next-token distributions (zero, with zero
    gradient, at the start model), summed over the texts of a batch; ``lm``: the mean token NLL, summed over
    the texts of a batch.
    """

    def __init__(self, kind: Literal["kl", "lm"], start_model: Any, tokenizer: Any, texts: Sequence[str],
                 batch_size: int = 8) -> None:
        if kind not in ("kl", "lm"):
            raise FairforgetError(f"unknown retain term {kind!r}: use kl or lm")
        if not texts or batch_size < 1:
            raise FairforgetError("a retain term needs at least one text and a batch size of at least 1")
        self.kind, self.batch_size, self.pad_id = kind, batch_size, tokenizer.pad_token_id
        self.encoded = [encode(tokenizer, "", t) for t in texts]
        self.reference = None
        if kind == "kl":
            self.reference = copy.deepcopy(start_model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.position = 0
        self.last_value = float("nan")

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next ``batch_size`` texts, wrapping around."""
        idx = [(self.position + i) % len(self.encoded) for i in range(self.batch_size)]
        self.position = (self.position + self.batch_size) % len(self.encoded)
        return collate([self.encoded[i] for i in idx], self.pad_id)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain loss of one batch (differentiable)."""
        device = next(model.parameters()).device
        batch = {name: value.to(device) for name, value in batch.items()}
        predicts = batch["target_mask"][:, 1:]
        rows = torch.nonzero(predicts, as_tuple=True)[0]
        counts = predicts.sum(1).clamp(min=1).to(torch.float32)
        _, head = backbone_and_head(model)
        logp = torch.log_softmax(head(hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
                                      [predicts]).float(), -1)
        if self.kind == "lm":
            per_token = -logp.gather(-1, batch["input_ids"][:, 1:][predicts][:, None]).squeeze(-1)
        else:
            with torch.no_grad():
                _, ref_head = backbone_and_head(self.reference)
                ref = torch.log_softmax(ref_head(hidden_states(self.reference, batch["input_ids"],
                                                               batch["attention_mask"])[:, :-1][predicts]).float(), -1)
            per_token = (ref.exp() * (ref - logp)).sum(-1)
        per_text = torch.zeros(len(counts), device=per_token.device).index_add(0, rows, per_token) / counts
        return per_text.sum()

    def gradients(self, model: Any, tensors: Sequence[PartitionedTensor]) -> list[torch.Tensor | None]:
        """Gradient of the next batch's retain loss per tensor (``.grad`` left as None)."""
        for t in tensors:
            t.param.grad = None
        value = self.loss(model, self.next_batch())
        value.backward()
        self.last_value = float(value.detach())
        grads = [t.param.grad for t in tensors]
        for t in tensors:
            t.param.grad = None
        return grads


def differing_span(a: Sequence[int], d: Sequence[int]) -> tuple[int, int]:
    """(common prefix length, common suffix length) of two token sequences, the suffix not overlapping it."""
    if list(a) == list(d):
        raise FairforgetError("the two sentences of a pair tokenize identically")
    prefix = 0
    while prefix < min(len(a), len(d)) and a[prefix] == d[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(d)) - prefix and a[-1 - suffix] == d[-1 - suffix]:
        suffix += 1
    return prefix, suffix


def target_encoding(ids: Sequence[int], prefix: int, suffix: int, target_tokens: TargetTokens) -> Encoded:
    """One side of a pair with only its ``target_tokens`` scored (a causal LM never reads later tokens, so the
    ``differing`` span is scored on the sequence cut after it)."""
    ids = tuple(ids)
    if target_tokens == "all":
        return Encoded(ids, 1)
    span_end = len(ids) - suffix
    if target_tokens == "differing":
        return Encoded(ids[:max(span_end, prefix + 1)], prefix)
    if target_tokens == "differing_after":
        return Encoded(ids, prefix)
    if target_tokens == "after":
        return Encoded(ids, span_end)
    raise FairforgetError(f"unknown target tokens {target_tokens!r}: use one of {', '.join(TARGET_TOKENS)}")


def encode_pairs(tokenizer: Any, pairs: Sequence[Any],
                 target_tokens: TargetTokens = "all") -> tuple[list[Encoded], list[Encoded]]:
    """Encoded advantaged and disadvantaged sentences (conditioned on BOS/EOS) of ``Pair`` objects, each with
    only its ``target_tokens`` scored."""
    adv, dis = [], []
    for pair in pairs:
        a, d = encode(tokenizer, "", pair.advantaged), encode(tokenizer, "", pair.disadvantaged)
        prefix, suffix = differing_span(a.ids, d.ids)
        if target_tokens == "after" and suffix == 0:
            raise FairforgetError(f"pair {pair.pair_id}: nothing follows the differing tokens, so "
                                  f"--target-tokens after scores nothing; use differing or all")
        adv.append(target_encoding(a.ids, prefix, suffix, target_tokens))
        dis.append(target_encoding(d.ids, prefix, suffix, target_tokens))
    return adv, dis


def pair_gap(model: Any, adv: Sequence[Encoded], dis: Sequence[Encoded], pad_id: int,
             batch_size: int = 32) -> dict[str, float]:
    """Mean f(adv) - f(dis) over pairs and the share of pairs where the advantaged side is more likely."""
    fa = [s.mean for s in score_encoded(model, adv, pad_id, batch_size)]
    fd = [s.mean for s in score_encoded(model, dis, pad_id, batch_size)]
    gaps = torch.tensor(fa) - torch.tensor(fd)
    return {"mean_f_adv": float(torch.tensor(fa).mean()), "mean_f_dis": float(torch.tensor(fd).mean()),
            "mean_gap": float(gaps.mean()), "share_adv_preferred": float((gaps > 0).float().mean())}


def nonfinite_parameters(tensors: Sequence[PartitionedTensor]) -> list[str]:
    """Names of tensors holding NaN or infinite values."""
    return [t.name for t in tensors if not torch.isfinite(t.param).all()]
