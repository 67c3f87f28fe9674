"""Tiny randomly initialised models of real architectures (Llama, Mamba, GPT-2), for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fairforget.errors import FairforgetError

ARCHITECTURES = ("llama", "mamba", "gpt2")


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A small config of ``arch`` (about 3M parameters with a 49k vocabulary, mostly embeddings)."""
    from transformers import GPT2Config, LlamaConfig, MambaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, **overrides)
    if arch == "mamba":
        return MambaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, state_size=16,
                           expand=2, conv_kernel=4, use_mambapy=False, **overrides)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, **overrides)
    raise FairforgetError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_tiny_model(arch: str, tokenizer: Any, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised causal LM of ``arch`` sized for ``tokenizer``, in fp32 eval mode."""
    from transformers import AutoModelForCausalLM

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(arch, len(tokenizer), **{**special, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny_model(arch: str, tokenizer: Any, folder: Path | str, seed: int = 0) -> Path:
    """Build a tiny model and save it with its tokenizer as a loadable Hugging Face folder."""
    folder = Path(folder)
    model = build_tiny_model(arch, tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
