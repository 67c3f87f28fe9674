"""Recovery fine-tuning after head pruning: teach the answers back without undoing the pruning.

Training items are mitigation examples of both conditions in their natural proportion: disambiguated ones
with the named person as gold and ambiguous ones with "unknown" as gold (training on disambiguated items
alone would teach the model away from "unknown", i.e. towards the bias the evaluation measures). The loss
is on the answer only: letter mode, -log p(gold letter) as the next token (bare and space-prefixed tokens
summed, as the BBQ scorer reads letters); answer mode, the per-token mean NLL of the gold answer text after
the prompt (the tokens the answer-mode scorer reads).

The trainable set cannot rescale a head. A head's output is an attention-weighted average of value vectors
(weights summing to 1) projected by its slice of the output projection, so only the value and output
projections scale it; query and key projections only move the attention weights. LoRA (the default) adapts
``q_proj``, ``k_proj`` and the MLP (Llama; GPT-2 its MLP only, ``c_attn`` holding the values), merged back
afterwards; full fine-tuning trains everything but the value and output projections. Either way the pruned
heads keep exactly their scale.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch

from fairforget.checkpoint import Checkpointer
from fairforget.choice_scoring import encode_option, encode_prompt, letter_token_ids
from fairforget.errors import FairforgetError
from fairforget.heads import batch_prompts, letter_logprobs_and_heads
from fairforget.methods.lora import add_lora
from fairforget.scoring import Encoded, collate, token_logprobs
from fairforget.training import StepLog, shuffled_batches, start_training

Mode = Literal["lora", "full"]
# modules that cannot rescale a head's output (see the module docstring), per architecture
SAFE_TARGETS = {"llama": ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "mlp.c_proj"]}
# modules that can: frozen in full fine-tuning, refused as LoRA targets
HEAD_SCALING = {"llama": ["v_proj", "o_proj"], "gpt2": ["c_attn", "attn.c_proj"]}


def answer_loss(model: Any, batch: dict[str, torch.Tensor], gold: torch.Tensor,
                letter_variants: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean -log p(gold letter | prompt) over the batch (probability over the whole vocabulary)."""
    logprobs, _ = letter_logprobs_and_heads(model, None, batch, letter_variants)
    return -logprobs.gather(1, gold[:, None].to(logprobs.device)).mean()


def encode_answers(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[Encoded]:
    """Each prompt followed by its answer text, tokenized as the answer-mode scorer does (answer tokens scored)."""
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt)
        encoded.append(Encoded(tuple(prompt_ids) + tuple(encode_option(tokenizer, answer)), len(prompt_ids)))
    return encoded


def text_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's per-token mean NLL of its scored (answer) tokens."""
    sums, counts = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    return -(sums / counts.clamp_min(1)).mean()


def _model_type(model: Any) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(inner.config, "model_type", "")
    if model_type not in SAFE_TARGETS:
        raise FairforgetError(f"recovery knows which modules can rescale heads only for {', '.join(SAFE_TARGETS)} "
                              f"models, not {model_type!r}")
    return model_type


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def recovery_targets(model: Any, override: Sequence[str] | None = None) -> list[str]:
    """LoRA targets: the given ones (refused when one can rescale a head), else the architecture's safe set."""
    model_type = _model_type(model)
    targets = list(override) if override else list(SAFE_TARGETS[model_type])
    unsafe = [t for t in targets if any(_matches(t, u) or _matches(u, t) for u in HEAD_SCALING[model_type])]
    if unsafe:
        raise FairforgetError(f"LoRA on {', '.join(unsafe)} could rescale the pruned heads and undo the head "
                              f"pruning; leave {', '.join(HEAD_SCALING[model_type])} out of --lora-targets")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        raise FairforgetError(f"LoRA target module(s) {', '.join(missing)} not found in this {model_type} model")
    return targets


def frozen_parameters(model: Any) -> list[str]:
    """Names of the parameters full fine-tuning leaves alone: every value and output projection."""
    scaling = HEAD_SCALING[_model_type(model)]
    return [n for n, _ in model.named_parameters() if any(_matches(n.rsplit(".", 1)[0], s) for s in scaling)]


def prepare_model(model: Any, mode: Mode = "lora", targets: Sequence[str] | None = None, r: int = 8,
                  alpha: int = 16, dropout: float = 0.05, seed: int = 0) -> Any:
    """The model ready to train: LoRA on the safe targets, or every parameter but the value and output
    projections trainable."""
    if mode == "lora":
        return add_lora(model, recovery_targets(model, targets), r=r, alpha=alpha, dropout=dropout, seed=seed)
    if mode == "full":
        frozen = set(frozen_parameters(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
        return model
    raise FairforgetError(f"unknown recovery mode {mode!r}: use lora or full")


def _train(model: Any, n_items: int, loss_of: Callable[[list[int]], torch.Tensor], epochs: int, batch_size: int,
           lr: float, seed: int, checkpoint: Checkpointer | None) -> list[StepLog]:
    """AdamW on ``loss_of(batch indices)``, shuffled each epoch (seeded); the model ends in eval, frozen."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise FairforgetError(f"recovery needs epochs >= 1, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    run = start_training(model, lr, 0.0, seed, checkpoint)
    for epoch, step, idx in shuffled_batches(n_items, epochs, batch_size, seed, run.checkpoint):
        loss = loss_of(idx)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.step(epoch, step, float(loss.detach()))
        run.log(StepLog(epoch, step, float(loss.detach()), len(idx)))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return run.history


def finetune_answers(model: Any, tokenizer: Any, prompts: Sequence[str], gold: Sequence[int],
                     letters: Sequence[str] = "ABC", epochs: int = 2, batch_size: int = 8, lr: float = 1e-4,
                     seed: int = 0, checkpoint: Checkpointer | None = None) -> list[StepLog]:
    """Letter mode: train -log p(gold letter) over (prompt, gold index) pairs. ``checkpoint`` saves the
    training state regularly and resumes a killed run where it stopped."""
    if not prompts or len(prompts) != len(gold):
        raise FairforgetError(f"recovery needs prompts with one gold answer each (got {len(prompts)} prompts, "
                              f"{len(gold)} answers)")
    if any(not 0 <= g < len(letters) for g in gold):
        raise FairforgetError(f"gold answer indices must lie in 0..{len(letters) - 1}")
    device = next(model.parameters()).device
    variants = letter_token_ids(tokenizer, letters)
    return _train(model, len(prompts), lambda idx: answer_loss(
        model, batch_prompts(tokenizer, [prompts[i] for i in idx], device), torch.tensor([gold[i] for i in idx]),
        variants), epochs, batch_size, lr, seed, checkpoint)


def finetune_answer_texts(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                          epochs: int = 2, batch_size: int = 8, lr: float = 1e-4, seed: int = 0,
                          checkpoint: Checkpointer | None = None) -> list[StepLog]:
    """Answer mode: train the per-token NLL of each prompt's gold answer text (with its leading space)."""
    if not prompts or len(prompts) != len(answers):
        raise FairforgetError(f"recovery needs prompts with one gold answer each (got {len(prompts)} prompts, "
                              f"{len(answers)} answers)")
    device = next(model.parameters()).device
    encoded = encode_answers(tokenizer, prompts, answers)
    return _train(model, len(prompts), lambda idx: text_loss(
        model, collate([encoded[i] for i in idx], tokenizer.pad_token_id, device)),
        epochs, batch_size, lr, seed, checkpoint)


def merged(model: Any) -> Any:
    """A plain transformers model: LoRA adapters merged in (a non-peft model is returned as it is)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload().eval()
    return model.eval()
