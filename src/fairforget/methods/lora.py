"""LoRA fine-tuning of a causal LM on plain sentences: target modules per architecture, a seeded loop, saving.

Targets (overridable): Mamba ``in_proj``, ``x_proj``, ``embeddings`` (peft refuses ``out_proj`` and
``conv1d``; ``dt_proj`` trains only on the slow path); Llama the attention and MLP projections; GPT-2
``c_attn``, ``c_proj``, ``c_fc``. The loss is the mean negative log-likelihood per token, each sentence
conditioned on the BOS/EOS token, computed with the shared differentiable scorer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fairforget import distributed
from fairforget.checkpoint import Checkpointer
from fairforget.artifacts import atomic_dir
from fairforget.errors import FairforgetError
from fairforget.scoring import collate, encode, score_continuations, token_logprobs
from fairforget.training import StepLog, shuffled_batches, start_training, step_bar

log = logging.getLogger(__name__)

TARGET_MODULES = {
    "mamba": ["in_proj", "x_proj", "embeddings"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
# With the Mamba CUDA kernels (mamba_ssm + causal_conv1d) the fused path reads these weights directly,
# so LoRA deltas on them are ignored during training.
MAMBA_KERNEL_BYPASSED = ("x_proj", "dt_proj", "out_proj")


@dataclass(frozen=True)
class LoRATrainingConfig:
    """The settings every LoRA-trained method shares (its typed config extends these)."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    lora_r: int
    lora_alpha: int


def target_modules(model: Any, override: Sequence[str] | None = None) -> list[str]:
    """LoRA target module names for ``model`` (its ``config.model_type``), checked to exist in it."""
    model_type = getattr(model.config, "model_type", "")
    if override:
        targets = list(override)
    elif model_type in TARGET_MODULES:
        targets = list(TARGET_MODULES[model_type])
    else:
        raise FairforgetError(f"no default LoRA targets for model type {model_type!r}; pass --target-modules "
                              f"(known types: {', '.join(TARGET_MODULES)})")
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise FairforgetError(f"LoRA target module(s) {', '.join(missing)} not found in this {model_type} model")
    return targets


def kernel_bypass_warning(model: Any, targets: Sequence[str]) -> str | None:
    """A warning when Mamba's CUDA kernels would bypass LoRA on some targets, else None."""
    if getattr(model.config, "model_type", "") != "mamba":
        return None
    device = next(model.parameters()).device
    try:
        from transformers.models.mamba.modeling_mamba import is_fast_path_available
    except ImportError:
        return None
    bypassed = [t for t in targets if t in MAMBA_KERNEL_BYPASSED]
    if device.type == "cuda" and is_fast_path_available and bypassed:
        return (f"the Mamba CUDA kernels are installed: during training they bypass LoRA on {', '.join(bypassed)}; "
                f"those adapters will stay at their initial value (use the targets in_proj, embeddings)")
    return None


def add_lora(model: Any, targets: Sequence[str], r: int = 8, alpha: int = 16, dropout: float = 0.05,
             seed: int = 0) -> Any:
    """Wrap ``model`` in a peft LoRA model (seeded adapter initialisation)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def lm_loss(model: Any, batch: dict[str, torch.Tensor], n_tokens: float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per scored token of a collated batch (divided by ``n_tokens`` instead of
    the batch's own token count when given, e.g. the count of a batch split over processes)."""
    sums, counts = token_logprobs(model, **batch)
    return -sums.sum() / (counts.sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1))


def finetune(model: Any, tokenizer: Any, texts: Sequence[str], epochs: int = 3, batch_size: int = 8,
             lr: float = 5e-5, weight_decay: float = 0.0, seed: int = 0,
             checkpoint: Checkpointer | None = None,
             on_step: Callable[[StepLog], None] | None = None, desc: str = "LoRA fine-tuning") -> list[StepLog]:
    """Train the trainable parameters of ``model`` with AdamW on ``texts`` (shuffled each epoch, seeded).

    The loop's one progress bar is named ``desc`` (callers name it here rather than wrapping it in a bar of their
    own); ``on_step`` is called with each step's log. ``checkpoint`` saves the training state regularly and
    resumes a killed run where it stopped. Under
    several processes (``fairforget.distributed``) each takes a share of every batch and the gradients of
    the batch's token-mean loss are summed: the same step as one process.
    """
    if not texts:
        raise FairforgetError("no training sentences")
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, "", text) for text in texts]
    run = start_training(model, lr, weight_decay, seed, checkpoint)
    bar = step_bar(run, epochs * -(-len(encoded) // batch_size), desc)
    for epoch, step, indices in shuffled_batches(len(encoded), epochs, batch_size, seed, run.checkpoint):
        mine = distributed.shard(indices)  # all of it in one process
        batch = collate([encoded[i] for i in mine], tokenizer.pad_token_id, device) if mine else None
        n_tokens = distributed.all_sum(int(batch["target_mask"].sum()) if mine else 0)
        # fewer examples than processes: this process contributes zero loss and zero gradients
        loss = lm_loss(model, batch, n_tokens) if mine else torch.zeros((), device=device)
        batch_loss = distributed.all_sum(float(loss.detach()))
        run.optimizer.zero_grad(set_to_none=True)
        if mine:
            loss.backward()
        distributed.sum_gradients(run.params)
        run.step(epoch, step, batch_loss)
        run.log(StepLog(epoch, step, batch_loss, n_tokens))
        bar.set_postfix(epoch=epoch, loss=f"{batch_loss:.4f}")
        bar.update(1)
        if on_step is not None:
            on_step(run.history[-1])
    bar.close()
    model.eval()
    return run.history


def mean_loss(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> float:
    """Token-weighted mean NLL of ``texts`` (no gradient)."""
    scores = score_continuations(model, tokenizer, [("", t) for t in texts], batch_size, desc="mean loss")
    return -sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores)


def save_adapter(model: Any, tokenizer: Any, folder: Path | str, base_spec: str) -> Path:
    """Save the LoRA adapter (peft ``save_pretrained``) and tokenizer atomically, naming ``base_spec`` as base.

    ``base_spec`` is what :func:`fairforget.models.load_model` should load the base from (a folder, a hub id
    or an ``embedded:`` name), so ``load_model(folder)`` rebuilds the fine-tuned model.
    """
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_spec
    with atomic_dir(folder, "adapter") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(folder)
