"""Partitioned Contrastive Gradient Unlearning (Yu et al., Findings ACL 2023) for causal LMs.

For a batch of pairs (x_a, x_d) differing only in the group term, with f(x) the mean token log-likelihood
of x (each sentence conditioned on the BOS/EOS token):

1. g_a = grad sum_batch f(x_a) and g_d = grad sum_batch f(x_d) (two backward passes);
2. every weight with >= 2 dimensions is split into partitions along one axis: ``rows`` (input aggregation,
   one partition per output neuron, per token for embeddings) or ``columns`` (one per input feature);
   every 1-D tensor is one partition;
3. c_p = cosine(g_a[p], g_d[p]) per partition, computed per tensor in one vectorised operation; a partition
   where either gradient is zero (or absent) has no defined cosine and is never selected;
4. the k partitions with the lowest cosine are updated by plain SGD, theta_p -= lr * g_a[p] (lowering the
   advantaged sentence's likelihood), or theta_p += lr * g_d[p] (``disadvantaged``), or with ``dynamic``
   direction the side the model currently prefers in each pair is lowered. Nothing else changes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from .errors import FairforgetError
from .scoring import Encoded, collate, encode, token_logprobs

Aggregation = Literal["rows", "columns"]
Direction = Literal["advantaged", "disadvantaged", "dynamic"]


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


def select_lowest(cosines: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Indices, per tensor, of the ``k`` partitions with the lowest cosine over all tensors (never +inf)."""
    flat = torch.cat(list(cosines))
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


def gradients(model: Any, tensors: Sequence[PartitionedTensor],
              batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(f per row, grad of sum f per tensor); the gradients are taken from ``.grad``, which is left as None."""
    for t in tensors:
        t.param.grad = None
    scores = sequence_scores(model, batch)
    scores.sum().backward()
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


def pcgu_step(model: Any, tensors: Sequence[PartitionedTensor], adv: Sequence[Encoded], dis: Sequence[Encoded],
              pad_id: int, k: int, lr: float, direction: Direction = "advantaged") -> StepResult:
    """One PCGU update on a batch of pairs (``adv[i]``, ``dis[i]``); see the module docstring."""
    if len(adv) != len(dis) or not adv:
        raise FairforgetError(f"a PCGU batch needs equal, non-zero numbers of pairs, got {len(adv)} and {len(dis)}")
    device = tensors[0].param.device
    lowered = ["adv"] * len(adv)
    lower, keep = list(adv), list(dis)
    if direction == "dynamic":
        with torch.no_grad():
            f_a0 = sequence_scores(model, collate(adv, pad_id, device))
            f_d0 = sequence_scores(model, collate(dis, pad_id, device))
        lowered = ["adv" if a >= d else "dis" for a, d in zip(f_a0.tolist(), f_d0.tolist())]
        lower = [a if side == "adv" else d for a, d, side in zip(adv, dis, lowered)]
        keep = [d if side == "adv" else a for a, d, side in zip(adv, dis, lowered)]
    f_low, g_low = gradients(model, tensors, collate(lower, pad_id, device))
    f_keep, g_keep = gradients(model, tensors, collate(keep, pad_id, device))
    cosines = [partition_cosines(ga, gd, t.axis, t.n_partitions) for t, ga, gd in zip(tensors, g_low, g_keep)]
    chosen = select_lowest(cosines, k)
    for t, rows, ga, gd in zip(tensors, chosen, g_low, g_keep):
        grad, step = (gd, +lr) if direction == "disadvantaged" else (ga, -lr)
        if grad is not None:
            apply_update(t, grad, rows, step)
    f_adv = [fl if side == "adv" else fk for fl, fk, side in zip(f_low.tolist(), f_keep.tolist(), lowered)]
    f_dis = [fk if side == "adv" else fl for fl, fk, side in zip(f_low.tolist(), f_keep.tolist(), lowered)]
    picked = torch.cat([c[r] for c, r in zip(cosines, chosen)])
    by_module, by_layer = Counter(), Counter()
    for t, rows in zip(tensors, chosen):
        by_module[t.module_type] += rows.numel()
        by_layer[t.layer] += rows.numel()
    return StepResult(f_adv, f_dis, lowered, [r.numel() for r in chosen],
                      int(sum(torch.isfinite(c).sum() for c in cosines)),
                      float(picked.min()) if picked.numel() else float("nan"),
                      float(picked.max()) if picked.numel() else float("nan"),
                      dict(by_module), dict(by_layer))


def encode_pairs(tokenizer: Any, pairs: Sequence[Any]) -> tuple[list[Encoded], list[Encoded]]:
    """Encoded advantaged and disadvantaged sentences (conditioned on BOS/EOS) of ``Pair`` objects."""
    return ([encode(tokenizer, "", p.advantaged) for p in pairs], [encode(tokenizer, "", p.disadvantaged) for p in pairs])


def pair_gap(model: Any, adv: Sequence[Encoded], dis: Sequence[Encoded], pad_id: int,
             batch_size: int = 32) -> dict[str, float]:
    """Mean f(adv) - f(dis) over pairs and the share of pairs where the advantaged side is more likely."""
    from .scoring import score_encoded

    fa = [s.mean for s in score_encoded(model, adv, pad_id, batch_size)]
    fd = [s.mean for s in score_encoded(model, dis, pad_id, batch_size)]
    gaps = torch.tensor(fa) - torch.tensor(fd)
    return {"mean_f_adv": float(torch.tensor(fa).mean()), "mean_f_dis": float(torch.tensor(fd).mean()),
            "mean_gap": float(gaps.mean()), "share_adv_preferred": float((gaps > 0).float().mean())}


def nonfinite_parameters(tensors: Sequence[PartitionedTensor]) -> list[str]:
    """Names of tensors holding NaN or infinite values."""
    return [t.name for t in tensors if not torch.isfinite(t.param).all()]
