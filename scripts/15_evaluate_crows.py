"""Stage 15: CrowS-Pairs for causal LMs, per bias type and overall, with bootstrap 95% intervals.

    python scripts/15_evaluate_crows.py --model embedded:smollm2-135m-instruct [--limit N]
    python scripts/15_evaluate_crows.py --bias-types gender --limit none     # all 262 gender pairs
    python scripts/15_evaluate_crows.py --model models/debiased --compare-to outputs/crows/finetuned_lora

The metric is the share of pairs (x100) where the more-stereotyping sentence (``sent_more`` for stereo pairs,
``sent_less`` for antistereo pairs) has the higher full-sentence log-likelihood; 50 is ideal. Writes the shared
run folder (``fairforget.evals.interface``): metrics.json ({"evaluation", "metrics": metrics[group],
"provenance"} with the scoring choice), metrics.csv, items.jsonl, crows_by_bias_type.png to
``outputs/crows/<model>/``, and with ``--compare-to`` a paired comparison (comparison.json / .md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script
from fairforget.flags import EvaluationFlags
from fairforget.evals.crows import CROWS
from fairforget.evals.interface import check_stage_flags, run_stage
from fairforget.methods.registry import load_output
from fairforget.models import DEFAULT_EMBEDDED, model_name


@dataclass
class Config(EvaluationFlags):
    model: str = DEFAULT_EMBEDDED
    data: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    score: Literal["sum", "mean"] = field(default="sum", metadata={"help": "sentence log-likelihood: sum or mean"})
    limit: int | None = field(default=None, metadata={"help": "seeded sample of about N pairs, per bias type "
                                                               "(none: every pair)"})
    bias_types: list[str] = field(default_factory=list, metadata={"help": "only these bias types, e.g. gender "
                                                                         "(none given: every type)"})
    out: Path | None = output_field(None, "run", "run folder (default outputs/crows/<model>)")

    def validate(self) -> None:
        check_stage_flags(self)


def main(cfg: Config) -> None:
    data = CROWS.load(cfg.data, cfg.limit, cfg.seed, cfg.bias_types)
    run_stage(CROWS, cfg, data, cfg.out or Path("outputs/crows") / model_name(cfg.model), load=load_output,
              score=cfg.score)


if __name__ == "__main__":
    run_script(main, Config())
