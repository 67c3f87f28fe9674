"""BiasUnlearn (Liu et al. 2025, arXiv 2509.25673, code a101269/BiasUnlearn) on contrastive sentence pairs.

For pairs (stereotype side, anti-stereotype side), the same pairs PCGU trains on (never StereoSet):

    L = w_forget * L_NPO(forget) + w_retain * L_CE(retain) + w_kl * KL(pi_ref || pi_theta on retain)

* L_NPO = -(2 / beta) * mean log sigmoid(-beta * (log pi_theta(x) - log pi_ref(x))) over the forget
  sentences, log pi the sentence's summed token log-probability (negative preference optimisation, Zhang et
  al. 2024): it lowers the stereotype side's likelihood, with a bounded, vanishing push once it is below
  the reference.
* L_CE: mean negative log-likelihood per token of the retain sentences (the anti-stereotype side).
* KL: mean over the retain sentences' scored tokens of KL(pi_ref(. | prefix) || pi_theta(. | prefix)) over
  the whole vocabulary, pi_ref the starting model (the LoRA adapter switched off, or a frozen copy).
* Swapping: every ``check_every`` steps the pairs (or a seeded sample of them) are scored; when the model prefers the side currently
  being forgotten in fewer than half of them (the bias has reversed), forget and retain swap.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from fairforget.errors import FairforgetError
from fairforget.methods.lora import LoRATrainingConfig
from fairforget.methods.registry import Knob, MethodSpec, register_method
from fairforget.methods.pcgu import pair_gap
from fairforget.progress import progress
from fairforget.scoring import Encoded, backbone_and_head, collate
from fairforget.training import StepLog, shuffled_batches, start_training


def position_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """Log-distributions [n, V] at the positions predicting a scored token, those tokens [n] and their rows [n]."""
    body, head = backbone_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    predicts = batch["target_mask"][:, 1:]
    logp = torch.log_softmax(head(hidden[:, :-1][predicts]).float(), dim=-1)
    return logp, batch["input_ids"][:, 1:][predicts], torch.nonzero(predicts, as_tuple=True)[0]


def sequence_logprob(logp: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row sum of log p(target) from :func:`position_logprobs`' outputs."""
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(n_rows, dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2 / beta) * mean log sigmoid(-beta * (log pi_theta - log pi_ref)), per sentence log-likelihoods."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


def kl_to_reference(logp_theta: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta)."""
    return (logp_ref.exp() * (logp_ref - logp_theta)).sum(dim=-1).mean()


@contextmanager
def reference_of(model: Any, reference: Any | None) -> Iterator[Any]:
    """The starting model: ``reference`` when given, else ``model`` with its peft adapter disabled."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise FairforgetError("BiasUnlearn needs a LoRA model (its adapter off is the reference) or a reference model")


@dataclass
class Weights:
    forget: float = 1.0
    retain: float = 1.0
    kl: float = 1.0
    beta: float = 0.1


def losses(model: Any, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor], weights: Weights,
           reference: Any | None = None) -> dict[str, torch.Tensor]:
    """The three terms and their weighted total for one batch (``total`` carries the gradient)."""
    n_forget = forget["input_ids"].shape[0]
    with torch.no_grad(), reference_of(model, reference) as ref:
        ref_forget = sequence_logprob(*position_logprobs(ref, forget), n_forget)
        ref_retain, _, _ = position_logprobs(ref, retain)
    logp_f, targets_f, rows_f = position_logprobs(model, forget)
    logp_r, targets_r, _ = position_logprobs(model, retain)
    npo = npo_loss(sequence_logprob(logp_f, targets_f, rows_f, n_forget), ref_forget, weights.beta)
    ce = -logp_r.gather(-1, targets_r[:, None]).mean()
    kl = kl_to_reference(logp_r, ref_retain)
    total = weights.forget * npo + weights.retain * ce + weights.kl * kl
    return {"total": total, "npo": npo, "ce": ce, "kl": kl}


@dataclass
class UnlearnLog:
    steps: list[dict] = field(default_factory=list)
    swaps: list[dict] = field(default_factory=list)


def check_sample(n_pairs: int, n_check: int | None, seed: int = 0) -> list[int]:
    """The seeded pair indices the reversal check scores (all pairs when ``n_check`` is None or larger)."""
    if n_check is None or n_check >= n_pairs:
        return list(range(n_pairs))
    return sorted(random.Random(seed).sample(range(n_pairs), n_check))


def unlearn(model: Any, pad_id: int, adv: Sequence[Encoded], dis: Sequence[Encoded], weights: Weights,
            epochs: int = 1, batch_size: int = 8, lr: float = 1e-4, seed: int = 0, check_every: int = 10,
            reference: Any | None = None, check_pairs: int | None = None,
            on_epoch: Callable[[int], None] | None = None) -> UnlearnLog:
    """Train ``model``'s trainable parameters with BiasUnlearn on the pairs (``adv[i]``, ``dis[i]``); the
    reversal check scores ``check_pairs`` of them (seeded; None: all); ``on_epoch(epoch)`` runs (in eval mode)
    after each epoch's last step."""
    if len(adv) != len(dis) or not adv:
        raise FairforgetError(f"BiasUnlearn needs equal, non-zero numbers of pair sides, got {len(adv)}, {len(dis)}")
    device = next(model.parameters()).device
    run = start_training(model, lr, 0.0, seed, None)
    log = UnlearnLog()
    forget, retain, forgetting = list(adv), list(dis), "stereotype"
    checked = check_sample(len(adv), check_pairs, seed)
    batches = list(shuffled_batches(len(adv), epochs, batch_size, seed, run.checkpoint))
    steps_per_epoch = -(-len(adv) // batch_size)
    for epoch, step, idx in progress(batches, desc="BiasUnlearn", unit="step"):
        terms = losses(model, collate([forget[i] for i in idx], pad_id, device),
                       collate([retain[i] for i in idx], pad_id, device), weights, reference)
        value = float(terms["total"].detach())
        run.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        run.step(epoch, step, value)
        run.log(StepLog(epoch, step, value, len(idx)))
        log.steps.append({"epoch": epoch, "step": step, "forgetting": forgetting,
                          **{k: float(v.detach()) for k, v in terms.items()}})
        if check_every and step % check_every == 0:
            model.eval()
            gap = pair_gap(model, [forget[i] for i in checked], [retain[i] for i in checked], pad_id)
            model.train()
            if gap["share_adv_preferred"] < 0.5:  # the forgotten side is now the less likely one
                forget, retain = retain, forget
                forgetting = "anti-stereotype" if forgetting == "stereotype" else "stereotype"
                log.swaps.append({"step": step, "now_forgetting": forgetting, **gap})
        if on_epoch is not None and step % steps_per_epoch == 0:
            model.eval()
            on_epoch(epoch)
            model.train()
    model.eval()
    return log


@dataclass(frozen=True)
class BiasUnlearnConfig(LoRATrainingConfig):
    """BiasUnlearn's settings, saved next to its adapter."""

    w_forget: float
    w_retain: float
    w_kl: float
    beta: float
    check_every: int
    check_pairs: int | None
    limit: int
    seed: int


register_method(MethodSpec(
    name="bias_unlearn", title="BiasUnlearn (Liu et al. 2025: NPO forget, CE retain, KL)",
    script="34_bias_unlearn.py", config=BiasUnlearnConfig,
    knobs=(Knob("epochs", "training epochs"), Knob("w_forget", "weight of the NPO forget term")),
    zero_flags={"epochs": 0}, sizes={"epochs": 1, "limit": 0, "check_every": 10, "check_pairs": 32},
    saves_settings=True,
    inputs=lambda layout: [layout.pairs], data_flags=lambda layout: {"pairs": layout.pairs}))
