"""Debiasing methods compared side by side (``scripts/30_compare_methods.py``), one module each.

* :mod:`.cda`: two-sided counterfactual data augmentation, then the shared LoRA fine-tune.
* :mod:`.task_vector`: task-vector negation (Ilharco et al. 2023), theta_0 - lambda * (theta_ft - theta_0).
* :mod:`.self_debias`: Self-Debias (Schick et al. 2021), an inference-time wrapper every scorer accepts.
* :mod:`.bias_unlearn`: BiasUnlearn (Liu et al. 2025): NPO forget, cross-entropy retain, KL to the start.
* :mod:`.selection`: the StereoSet selection-half score that chooses a method's setting (never the held-out half).

PCGU (``fairforget.methods.pcgu``, stage 12) and head pruning (``fairforget.methods.heads``, stage 22) enter the comparison as
they are. Every method ends in a folder that :func:`fairforget.methods.load_method` loads: a Hugging Face
model or peft adapter folder, or a ``self_debias.json`` naming a base model and the Self-Debias settings.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

from fairforget.artifacts import provenance, read_json, write_json
from fairforget.methods.self_debias import SelfDebiasLM
from fairforget.models import LoadedModel, load_model

SELF_DEBIAS_FILE = "self_debias.json"


def load_method(spec: str, device: str = "auto") -> LoadedModel:
    """A method's model: ``load_model(spec)``, or the Self-Debias wrapper where ``spec`` holds ``self_debias.json``."""
    settings_file = Path(spec) / SELF_DEBIAS_FILE
    if not settings_file.is_file():
        return load_model(spec, device)
    settings: dict[str, Any] = read_json(settings_file, "Self-Debias settings")
    loaded = load_model(settings["base_model"], device)
    wrapped = SelfDebiasLM(loaded.model, loaded.tokenizer, settings["prefixes"], settings["decay_constant"],
                           settings.get("epsilon", 0.01))
    return LoadedModel(wrapped, loaded.tokenizer, f"self-debias-{loaded.name}",
                       f"{loaded.source} + Self-Debias ({settings_file})", loaded.device)


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (the whole method run: model, data, training)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def write_method_record(log_dir: Path, method: str, cfg: Any, seconds: float, data_files: list, **details: Any) -> dict:
    """``<log_dir>/method.json``: the method's wall time, peak memory, details and provenance."""
    record = {"method": method, "wall_seconds": round(seconds, 1), "peak_memory_mib": peak_memory_mib(),
              **details, "provenance": provenance(cfg, data_files)}
    write_json(Path(log_dir) / "method.json", record)
    return record
