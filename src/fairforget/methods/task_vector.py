"""Task-vector negation (Ilharco et al. 2023, "Editing models with task arithmetic"; as used for debiasing
by Dige et al. 2024).

Fine-tune the start model theta_0 on the stereotype-consistent (advantaged) side of the pair data to get
theta_ft; the task vector is tau = theta_ft - theta_0 and the debiased model theta_0 - lambda * tau. With a
LoRA fine-tune, theta_ft is the merged model, so tau is non-zero only in the adapted weights. lambda is
chosen on the StereoSet selection half (``fairforget.methods.selection``), never on the held-out half.

The **damage reference** (registered as ``damage_reference``) is the same procedure aimed at nothing: the task
vector of a fine-tune on neutral, non-gendered text (the ``retain`` half of
:func:`fairforget.evals.perplexity.load_neutral_texts`, never the held-out half perplexity is measured on), at the
advantaged side's token budget, negated and chosen by the same rule. It moves a model toward a random scorer
without targeting any bias, so SS drifts toward 50 by damage alone; a debiasing method helps only where it does
better than this reference at the same capability cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fairforget.errors import FairforgetError
from fairforget.methods.lora import LoRATrainingConfig
from fairforget.methods.registry import Knob, MethodSpec, register_method


def state_copy(model: Any) -> dict[str, torch.Tensor]:
    """A detached copy of every floating-point parameter and buffer of ``model``, by name."""
    return {name: t.detach().clone() for name, t in model.state_dict().items() if t.is_floating_point()}


def task_vector(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tau = theta_ft - theta_0 for every tensor of the base; both states must hold the same names and shapes."""
    missing = sorted(set(base) - set(finetuned))
    if missing:
        raise FairforgetError(f"the fine-tuned model lacks {len(missing)} tensors of the base (first: {missing[0]})")
    tau = {}
    for name, theta_0 in base.items():
        if finetuned[name].shape != theta_0.shape:
            raise FairforgetError(f"tensor {name} has shape {tuple(finetuned[name].shape)} after fine-tuning, "
                                  f"{tuple(theta_0.shape)} before")
        tau[name] = finetuned[name] - theta_0
    return tau


def apply_negation(model: Any, base: dict[str, torch.Tensor], tau: dict[str, torch.Tensor], lam: float) -> Any:
    """Set ``model``'s tensors to theta_0 - lambda * tau in place (lambda = 0: exactly theta_0) and return it."""
    state = model.state_dict()
    with torch.no_grad():
        for name, theta_0 in base.items():
            state[name].copy_(theta_0 - lam * tau[name] if lam else theta_0)
    return model


def tau_norms(tau: dict[str, torch.Tensor]) -> dict[str, float]:
    """The overall L2 norm of tau and the number of tensors it changes (for the log)."""
    changed = [t for t in tau.values() if torch.count_nonzero(t)]
    return {"tau_l2": float(torch.sqrt(sum((t.float() ** 2).sum() for t in changed))) if changed else 0.0,
            "tensors_changed": len(changed), "tensors": len(tau)}


@dataclass(frozen=True)
class TaskVectorConfig(LoRATrainingConfig):
    """Task-vector negation's settings, saved next to its model: the fine-tune (on the advantaged side, or neutral
    text for the damage reference) and the lambdas."""

    source: Literal["advantaged", "neutral"]
    lambdas: list
    selection_metric: str
    selection_limit: int | None
    max_lms_drop: float | None
    max_ppl_increase: float | None
    selection_ppl_texts: int
    half_seed: int
    limit: int
    seed: int


SOURCE_METHODS = {"advantaged": "task_vector", "neutral": "damage_reference"}
TITLES = {"advantaged": "task-vector negation (Ilharco et al. 2023; Dige et al. 2024)",
          "neutral": "damage reference: negated task vector of a neutral-text fine-tune (targets nothing)"}

for _source, _name in SOURCE_METHODS.items():
    register_method(MethodSpec(
        name=_name, title=TITLES[_source], script="32_task_vector.py", config=TaskVectorConfig,
        knobs=(Knob("lambdas", f"theta_0 - lambda tau ({_source} text); lambda chosen on the selection half"),),
        zero_flags={"lambdas": [0.0]}, saves_settings=True,
        sizes={"epochs": 1, "lambdas": [0.25, 0.5, 1.0, 2.0, 4.0], "selection_limit": 120},
        inputs=lambda layout: [layout.pairs, layout.stereoset],
        data_flags=lambda layout, source=_source: {"pairs": layout.pairs, "stereoset": layout.stereoset,
                                                   **({"source": source} if source != "advantaged" else {})}))
