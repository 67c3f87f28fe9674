"""Shared fixtures: the embedded SmolLM2 tokenizer and tiny random models of each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairforget.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (converted once from the embedded GGUF into models/base/)."""
    from transformers import AutoTokenizer

    from fairforget.models import prepare_embedded

    folder = prepare_embedded(models_dir=REPO / "models" / "base")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    """Tiny random Llama (grouped-query attention), Mamba and GPT-2 models sharing the SmolLM2 tokenizer."""
    return {arch: build_tiny_model(arch, tokenizer, seed=0) for arch in ("llama", "mamba", "gpt2")}


def load_script(name: str):
    """Import ``scripts/<name>`` as a module (its Config and main), registered so dataclasses work."""
    import importlib.util
    import sys

    module_name = "stage_" + Path(name).stem
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The verified dataset copies beside the checkout (../shared/data), as CI has them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def bars_back_on():
    """A stage run in-process with --quiet turns bars off for the process; every test starts with them on."""
    from fairforget.progress import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)
