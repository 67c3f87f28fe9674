"""Stage 13: StereoSet SS / LMS / ICAT (intra- and intersentence, per domain) with bootstrap 95% intervals.

    python scripts/13_evaluate_stereoset.py --model embedded:smollm2-135m-instruct [--limit N] [--half heldout]
    python scripts/13_evaluate_stereoset.py --model models/debiased --half heldout \\
        --compare-to outputs/stereoset/smollm2-135m-instruct-heldout

Writes the shared run folder (``fairforget.evals.interface``): metrics.json ({"evaluation", "metrics":
metrics[split][domain][metric], "provenance"}), metrics.csv, items.jsonl (one line per scored sentence),
ss_by_domain_<split>.png, and with --compare-to a paired comparison (comparison.json / .md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script
from fairforget.flags import EvaluationFlags
from fairforget.evals.interface import check_stage_flags, run_stage
from fairforget.methods.registry import load_output
from fairforget.evals.stereoset import STEREOSET
from fairforget.models import DEFAULT_EMBEDDED, model_name


@dataclass
class Config(EvaluationFlags):
    model: str = DEFAULT_EMBEDDED
    data: Path = Path("data/stereoset/dev.json")
    half: Literal["all", "selection", "heldout"] = field(
        default="all", metadata={"help": "seeded half of dev: selection (for checkpoint choice) or heldout"})
    half_seed: int = 0
    limit: int | None = field(default=None, metadata={"help": "stratified sample of about N examples"})
    out: Path | None = output_field(None, "run", "run folder (default outputs/stereoset/<model>[-half])")

    def validate(self) -> None:
        check_stage_flags(self)


def default_out(cfg: Config) -> Path:
    suffix = "" if cfg.half == "all" else f"-{cfg.half}"
    return Path("outputs/stereoset") / f"{model_name(cfg.model)}{suffix}"


def main(cfg: Config) -> None:
    data = STEREOSET.load(cfg.data, cfg.half, cfg.half_seed, cfg.limit, cfg.seed)
    run_stage(STEREOSET, cfg, data, cfg.out or default_out(cfg), load=load_output)


if __name__ == "__main__":
    run_script(main, Config())
