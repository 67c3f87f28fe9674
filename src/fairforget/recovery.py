"""Recovery fine-tuning after head pruning: teach the answer back on disambiguated examples.

The loss is on the answer only: the negative log-probability of the gold option letter as the next token
after the prompt (its bare and space-prefixed tokens summed, as the BBQ scorer reads letters). Callers pass
disambiguated examples only (the answer is in the context there; training on ambiguous ones would teach the
"unknown" letter, i.e. the bias metric itself). LoRA (peft) by default, merged back afterwards, or full
fine-tuning. Either way the attention output projections stay frozen, so the soft-pruned head slices keep
exactly their scale.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from .checkpoint import Checkpointer
from .choice_scoring import letter_token_ids
from .errors import FairforgetError
from .heads import batch_prompts, head_layout, letter_logprobs_and_heads
from .lora import add_lora, target_modules
from .training import StepLog, shuffled_batches, start_training

Mode = Literal["lora", "full"]


def answer_loss(model: Any, batch: dict[str, torch.Tensor], gold: torch.Tensor,
                letter_variants: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean -log p(gold letter | prompt) over the batch (probability over the whole vocabulary)."""
    logprobs, _ = letter_logprobs_and_heads(model, None, batch, letter_variants)
    return -logprobs.gather(1, gold[:, None].to(logprobs.device)).mean()


def recovery_targets(model: Any, override: Sequence[str] | None = None) -> list[str]:
    """LoRA targets: the given ones, else the architecture's defaults without the attention output projection."""
    if override:
        return target_modules(model, override)
    out_proj = head_layout(model).out_proj_name
    return [t for t in target_modules(model) if t != out_proj]


def prepare_model(model: Any, mode: Mode = "lora", targets: Sequence[str] | None = None, r: int = 8,
                  alpha: int = 16, dropout: float = 0.05, seed: int = 0) -> Any:
    """The model ready to train: LoRA-wrapped, or with every parameter but the output projections trainable."""
    if mode == "lora":
        chosen = recovery_targets(model, targets)
        if head_layout(model).out_proj_name in chosen:
            raise FairforgetError("a LoRA adapter on the attention output projection would undo the head pruning; "
                                  "leave it out of --lora-targets")
        return add_lora(model, chosen, r=r, alpha=alpha, dropout=dropout, seed=seed)
    if mode == "full":
        frozen = {id(p) for proj in head_layout(model).out_projs for p in proj.parameters()}
        for param in model.parameters():
            param.requires_grad_(id(param) not in frozen)
        return model
    raise FairforgetError(f"unknown recovery mode {mode!r}: use lora or full")


def finetune_answers(model: Any, tokenizer: Any, prompts: Sequence[str], gold: Sequence[int],
                     letters: Sequence[str] = "ABC", epochs: int = 2, batch_size: int = 8, lr: float = 1e-4,
                     seed: int = 0, checkpoint: Checkpointer | None = None) -> list[StepLog]:
    """AdamW on the answer loss over (prompt, gold index) pairs, shuffled each epoch (seeded); model ends in eval.

    ``checkpoint`` saves the training state regularly and resumes a killed run where it stopped."""
    if not prompts or len(prompts) != len(gold):
        raise FairforgetError(f"recovery needs prompts with one gold answer each (got {len(prompts)} prompts, "
                              f"{len(gold)} answers)")
    if any(not 0 <= g < len(letters) for g in gold):
        raise FairforgetError(f"gold answer indices must lie in 0..{len(letters) - 1}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise FairforgetError(f"recovery needs epochs >= 1, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    device = next(model.parameters()).device
    variants = letter_token_ids(tokenizer, letters)
    run = start_training(model, lr, 0.0, seed, checkpoint)
    for epoch, step, idx in shuffled_batches(len(prompts), epochs, batch_size, seed, run.checkpoint):
        batch = batch_prompts(tokenizer, [prompts[i] for i in idx], device)
        loss = answer_loss(model, batch, torch.tensor([gold[i] for i in idx]), variants)
        if not torch.isfinite(loss):
            raise FairforgetError(f"the recovery loss became non-finite at epoch {epoch}, step {step}; lower --lr")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.log(StepLog(epoch, step, float(loss.detach()), len(idx)))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return run.history


def merged(model: Any) -> Any:
    """A plain transformers model: LoRA adapters merged in (a non-peft model is returned as it is)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload().eval()
    return model.eval()
