"""Stage 17: WinoBias pair likelihood for causal LMs, per type and overall, with cluster-bootstrap 95% intervals.

    python scripts/17_evaluate_winobias.py --model embedded:smollm2-135m-instruct [--limit N] [--pairs all]
    python scripts/17_evaluate_winobias.py --model models/debiased --compare-to outputs/winobias/finetuned_lora

The metric is the share of pairs (x100) of the shipped test files (type 1 and type 2) where the pro-stereotyped
sentence has the higher full-sentence log-likelihood (sum of token log-probabilities); 50 is ideal. The pairs
that are not minimal (words other than the pronoun differ) are left out unless ``--pairs all``. Writes the
shared run folder (``fairforget.evals.interface``): metrics.json ({"evaluation", "metrics": metrics[group],
"provenance"} with the scoring rule), metrics.csv, items.jsonl, winobias_by_type.png to
``outputs/winobias/<model>/``, and with ``--compare-to`` a paired comparison with its minimum detectable change
(comparison.json / .md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script
from fairforget.flags import EvaluationFlags
from fairforget.evals.interface import check_stage_flags, run_stage
from fairforget.methods.registry import load_output
from fairforget.evals.winobias import WINOBIAS
from fairforget.models import DEFAULT_EMBEDDED, model_name


@dataclass
class Config(EvaluationFlags):
    model: str = DEFAULT_EMBEDDED
    data_dir: Path = field(default=Path("data/winobias/data"), metadata={"help": "folder of the WinoBias test files"})
    pairs: Literal["minimal", "all"] = field(default="minimal", metadata={
        "help": "minimal: only pairs differing in the pronoun alone; all: every line of the test files"})
    limit: int | None = field(default=None, metadata={"help": "seeded sample of about N pairs, per type "
                                                               "(none: every pair)"})
    out: Path | None = output_field(None, "run", "run folder (default outputs/winobias/<model>)")

    def validate(self) -> None:
        check_stage_flags(self)


def main(cfg: Config) -> None:
    data = WINOBIAS.load(cfg.data_dir, cfg.pairs, cfg.limit, cfg.seed)
    run_stage(WINOBIAS, cfg, data, cfg.out or Path("outputs/winobias") / model_name(cfg.model), load=load_output)


if __name__ == "__main__":
    run_script(main, Config())
