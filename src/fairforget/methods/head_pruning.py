"""Head pruning whose effect can be attributed to the heads: a per-head signal, an explicit choice, controls.

Signals (a score and a two-sided p-value per head):

* ``stereoset``: each head's first-order contribution to the stereotype preference (as FASP scores bias
  heads). With a gate g on every head's output, example i's log-odds b_i = score(stereotype) -
  score(anti-stereotype) (StereoSet's mean token log-probabilities) gets c_ih = db_i/dg_h at g = 1, so
  pruning head h by s moves b_i by about -s * c_ih. One backward pass per batch gives every example's
  c_ih (a gate per row). Score: the mean of c_ih over StereoSet *selection-half* examples; p: one-sample t test.
* ``bbq``: Pearson r of each head's activity at the answer position with the context influence
  KL(p_full || p_question) over the BBQ mitigation examples (letter or answer mode); p: t test of r.

Choice: the top k heads by score (signed: the largest scores, heads that push towards the stereotype or
track the context; unsigned: by |score|), or every head passing Benjamini-Hochberg at q (one-sided p when
signed). Each chosen head is scaled by 1 - strength. Controls: random heads with the same multiset of
strengths (:func:`random_like`), recovery with and without pruning, and chosen minus random with an
interval that resamples items (scenario clusters for BBQ) and random draws together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from fairforget.evals.bbq_eval import answer_continuation, build_prompt, option_order
from fairforget.errors import FairforgetError
from fairforget.choice_scoring import letter_token_ids
from fairforget.heads import (HeadActivity, batch_prompts, correlation_pvalues, frozen_weights, gate_gradient, head_activity,
                     head_correlations, head_hooks, head_layout, protect_heads, pruning_cost)
from fairforget.methods.recovery import encode_answers, finetune_answer_texts, finetune_answers, merged, prepare_model, text_loss
from fairforget.scoring import collate, encode, token_logprobs
from fairforget.progress import progress
from fairforget.stats import proportional_sample
from fairforget.evals.stereoset import scoring_requests

Signal = Literal["stereoset", "bbq"]
Select = Literal["top-k", "fdr"]
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5}  # recovery learning rates when --recovery-lr is not given
RANDOM_SEED_STRIDE = 1000  # random draw d of seed s uses seed s * stride + d (the same draws at every k)


@dataclass(frozen=True)
class HeadPruningConfig:
    """Head pruning's settings (stage 22), saved next to the pruned and the recovered model."""

    model: str
    signal: str
    signal_domain: str
    signal_limit: int | None
    activity: str
    select: str
    k: int
    q: float
    signed: bool
    strength: float
    protect_top: int
    recovery: str
    recovery_epochs: int
    recovery_lr: float | None
    mitigation_fraction: float
    mitigation_per_category: int
    split_seed: int
    seed: int


@dataclass(frozen=True)
class HeadRunConfig(HeadPruningConfig):
    """Stage 22's run: head pruning's settings, the controls, recovery, the held-out suite and folders."""

    eval_per_category: int
    mode: str
    permutations: str
    chat_template: str
    random_draws: int
    dose_ks: list[int]
    dose_random_draws: int
    protect_examples: int
    recovery_batch_size: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: list[str]
    evals: list[str]
    stereoset_path: Path
    stereoset_limit: int | None
    stereoset_gender_limit: int | None
    half_seed: int
    crows_path: Path
    crows_limit: int | None
    perplexity_texts: int
    batch_size: int
    n_boot: int
    localize_per_category: int
    localize_batch_size: int
    models_dir: Path
    settings_dir: Path | None
    checkpoint_every: int
    device: str


@dataclass
class HeadSignal:
    """A per-head score and two-sided p-value [layers, heads] over ``n`` examples."""

    kind: str
    score: torch.Tensor
    p_two_sided: torch.Tensor
    n: int
    definition: str

    def pvalues(self, signed: bool) -> torch.Tensor:
        """Two-sided p, or with ``signed`` the one-sided p of a positive score."""
        if not signed:
            return self.p_two_sided
        half = self.p_two_sided / 2
        return torch.where(self.score > 0, half, 1 - half)


def stereoset_contributions(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """c [examples, layers, heads]: d(stereotype - anti-stereotype mean log-probability)/d(head gate) at 1."""
    layout = head_layout(model)
    device = next(model.parameters()).device
    pairs = []
    for example in examples:
        requests = {label: (prefix, cont) for label, prefix, cont in scoring_requests(example)}
        pairs.append([encode(tokenizer, *requests[label]) for label in ("stereotype", "anti-stereotype")])
    out = torch.empty(len(examples), *layout.shape, dtype=torch.float64)
    with frozen_weights(model), torch.enable_grad():
        for start in progress(range(0, len(pairs), batch_size), desc="head contributions", unit="batch"):
            chunk = pairs[start: start + batch_size]
            batch = collate([e for pair in chunk for e in pair], tokenizer.pad_token_id, device)
            gates = torch.ones(len(chunk), *layout.shape, device=device, requires_grad=True)
            with head_hooks(layout, gates.repeat_interleave(2, dim=0)):
                sums, counts = token_logprobs(model, **batch)
            means = sums / counts
            (means[0::2] - means[1::2]).sum().backward()
            out[start: start + len(chunk)] = gates.grad.double().cpu()
    return out


def stereoset_signal(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 16) -> HeadSignal:
    """Mean contribution per head and its one-sample t-test p-value (two-sided)."""
    from scipy.stats import ttest_1samp

    if len(examples) < 3:
        raise FairforgetError(f"the StereoSet head signal needs at least 3 selection examples, got {len(examples)}")
    c = stereoset_contributions(model, tokenizer, examples, batch_size)
    p = np.nan_to_num(ttest_1samp(c.numpy(), 0.0, axis=0).pvalue, nan=1.0)
    return HeadSignal("stereoset", c.mean(0), torch.from_numpy(p), len(examples),
                      "mean over StereoSet selection-half examples of d(mean logp stereotype - mean logp anti)/d(gate);"
                      " p: one-sample t test")


def bbq_signal(model: Any, tokenizer: Any, examples: Sequence[Any], mode: str, chat_tokenizer: Any, seed: int,
               batch_size: int, activity: str = "delta") -> tuple[HeadSignal, HeadActivity, list[tuple[int, ...]]]:
    """Correlation of each head's activity with the context influence on BBQ mitigation examples."""
    orders = [option_order(e, seed) for e in examples]
    full = [build_prompt(e, o, True, chat_tokenizer) for e, o in zip(examples, orders)]
    question = [build_prompt(e, o, False, chat_tokenizer) for e, o in zip(examples, orders)]
    options = ([[answer_continuation(p, e.answers[i]) for i in o] for p, e, o in zip(full, examples, orders)]
               if mode == "answer" else None)
    act = head_activity(model, tokenizer, full, question, batch_size=batch_size, options=options)
    r = head_correlations(getattr(act, activity), act.influence)
    return (HeadSignal("bbq", r, correlation_pvalues(r, len(examples)), len(examples),
                       f"Pearson r of head {activity} at the answer position with KL(p_full || p_question) "
                       f"({mode} mode); p: t test of r"), act, orders)


def benjamini_hochberg(p: torch.Tensor, q: float) -> torch.Tensor:
    """Boolean mask (shape of ``p``) of the discoveries of the Benjamini-Hochberg step-up procedure at ``q``."""
    if not 0 < q < 1:
        raise FairforgetError(f"--q must lie in (0, 1), got {q}")
    flat = p.flatten().double()
    order = torch.argsort(flat, stable=True)
    m = flat.numel()
    passing = torch.nonzero(flat[order] <= q * torch.arange(1, m + 1, dtype=torch.float64) / m).flatten()
    mask = torch.zeros(m, dtype=torch.bool)
    if passing.numel():
        mask[order[: int(passing.max()) + 1]] = True
    return mask.reshape(p.shape)


def select_heads(signal: HeadSignal, select: Select, k: int, q: float, signed: bool, strength: float) -> torch.Tensor:
    """Pruning strengths [layers, heads]: ``strength`` on the chosen heads, 0 elsewhere."""
    if not 0 <= strength <= 1:
        raise FairforgetError(f"--strength must lie in [0, 1] (0: the start model), got {strength}")
    key = (signal.score if signed else signal.score.abs()).flatten().double()
    if select == "top-k":
        if not 0 <= k <= key.numel():
            raise FairforgetError(f"--k must lie in 0..{key.numel()} (the model's heads), got {k}")
        mask = torch.zeros(key.numel(), dtype=torch.bool)
        mask[torch.argsort(-key, stable=True)[:k]] = True
        mask = mask.reshape(signal.score.shape)
    elif select == "fdr":
        mask = benjamini_hochberg(signal.pvalues(signed), q)
    else:
        raise FairforgetError(f"--select must be top-k or fdr, got {select!r}")
    return torch.where(mask, torch.tensor(float(strength), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))


def random_like(strengths: torch.Tensor, seed: int) -> torch.Tensor:
    """The same multiset of strengths placed on heads drawn uniformly at random (a seeded permutation)."""
    flat = strengths.flatten()
    perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    out = torch.zeros_like(flat)
    out[perm] = flat
    return out.reshape(strengths.shape)


def random_draws(strengths: torch.Tensor, seed: int, n: int) -> list[torch.Tensor]:
    return [random_like(strengths, seed * RANDOM_SEED_STRIDE + d) for d in range(n)]


def heads_of(strengths: torch.Tensor) -> list[dict]:
    """The pruned heads and their strengths, for the record."""
    return [{"layer": int(l), "head": int(h), "strength": float(strengths[l, h])}
            for l, h in torch.nonzero(strengths > 0).tolist()]


def recover(model: Any, tokenizer: Any, examples: Sequence[Any], orders: Sequence[Sequence[int]],
            prompts: Sequence[str], mode: str, cfg: HeadRunConfig, checkpoint: Any = None) -> tuple[Any, list, float]:
    """Recovery fine-tuning on every mitigation example (gold "unknown" for ambiguous ones, as they occur):
    returns the merged model, its step log and the learning rate."""
    lr = cfg.recovery_lr or DEFAULT_LR[cfg.recovery]
    model = prepare_model(model, cfg.recovery, cfg.lora_targets or None, cfg.lora_r, cfg.lora_alpha,
                          cfg.lora_dropout, cfg.seed)
    settings = dict(epochs=cfg.recovery_epochs, batch_size=cfg.recovery_batch_size, lr=lr, seed=cfg.seed,
                    checkpoint=checkpoint)
    if mode == "answer":
        answers = [answer_continuation(p, e.answers[e.label]) for p, e in zip(prompts, examples)]
        history = finetune_answer_texts(model, tokenizer, prompts, answers, **settings)
    else:
        gold = [list(o).index(e.label) for e, o in zip(examples, orders)]
        history = finetune_answers(model, tokenizer, prompts, gold, **settings)
    return merged(model), history, lr


def protection_examples(examples: Sequence[Any], n: int, seed: int) -> list[int]:
    """Indices of about ``n`` mitigation examples, proportional per category x context condition."""
    cells: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        cells.setdefault(f"{e.category}|{e.context_condition}", []).append(i)
    return sorted(proportional_sample([cells[c] for c in sorted(cells)], n, seed))


def protect(model: Any, tokenizer: Any, examples: Sequence[Any], prompts: Sequence[str],
            orders: Sequence[Sequence[int]], strengths: torch.Tensor,
            cfg: HeadRunConfig) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Unselect the ``cfg.protect_top`` chosen heads whose pruning most raises the gold-answer loss (first
    order) on stratified protection examples; returns (strengths, protected heads, cost)."""
    layout = head_layout(model)
    device = next(model.parameters()).device
    chosen = protection_examples(examples, cfg.protect_examples, cfg.seed)
    batches = [chosen[k: k + cfg.batch_size] for k in range(0, len(chosen), cfg.batch_size)]
    if cfg.mode == "answer":
        encoded = encode_answers(tokenizer, [prompts[i] for i in chosen],
                                 [answer_continuation(prompts[i], examples[i].answers[examples[i].label]) for i in chosen])
        by_index = dict(zip(chosen, encoded))
        losses = [lambda idx=idx: text_loss(model, collate([by_index[i] for i in idx], tokenizer.pad_token_id, device))
                  * len(idx) / len(chosen) for idx in batches]
        cost = -strengths.double() * gate_gradient(model, layout, losses)
    else:
        cost = pruning_cost(model, layout, [batch_prompts(tokenizer, [prompts[i] for i in idx], device) for idx in batches],
                            [torch.tensor([list(orders[i]).index(examples[i].label) for i in idx]) for idx in batches],
                            letter_token_ids(tokenizer, "ABC"), strengths)
    kept, protected = protect_heads(strengths, cost, cfg.protect_top)
    return kept, protected, cost
