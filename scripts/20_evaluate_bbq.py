"""Stage 20: BBQ by category: accuracy, s_DIS and s_AMB with bootstrap 95% intervals.

    python scripts/20_evaluate_bbq.py --model embedded:smollm2-135m-instruct --per-category 50
    python scripts/20_evaluate_bbq.py --model M --mode answer --categories Age Religion --out outputs/bbq/M-answer

Multiple-choice prompt (context, question, options A/B/C in a seeded per-item order, "Answer:"), in the
model's chat template when it has one (--chat-template auto). --mode letter: the option letter with the
highest next-token probability (bare and space-prefixed letter tokens summed); --mode answer: each answer
text's log-likelihood after the prompt (per-token mean by default, --answer-norm sum), the prompt computed
once for its three options. Bias scores as in Parrish et al. 2022 (see fairforget.evals.bbq_metrics).
Writes the shared run folder (``fairforget.evals.interface``): metrics.json ({"evaluation", "metrics": per
category and overall with the exclusions, "provenance"}), metrics.csv, items.jsonl, bias_scores.txt and
bias_scores.png to --out (default outputs/bbq/<model>/), and with --compare-to a paired comparison on the same
items (comparison.json / .md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script
from fairforget.flags import EvaluationFlags
from fairforget.evals.bbq import CATEGORIES
from fairforget.evals.bbq_eval import BBQ
from fairforget.evals.interface import check_stage_flags, run_stage
from fairforget.methods.registry import load_output
from fairforget.models import DEFAULT_EMBEDDED, model_name

Category = Literal[CATEGORIES]  # type: ignore[valid-type]


@dataclass
class Config(EvaluationFlags):
    model: str = DEFAULT_EMBEDDED
    data_dir: Path = Path("data/bbq")
    categories: list[Category] = field(default_factory=list, metadata={"help": "BBQ categories (default: all 11)"})
    per_category: int | None = field(
        default=None, metadata={"help": "examples per category, stratified by condition x polarity (default: all)"})
    mode: Literal["letter", "answer"] = "letter"
    answer_norm: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "answer mode: choose by per-token mean or summed log-likelihood"})
    chat_template: Literal["auto", "on", "off"] = "auto"
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    seed: int = field(default=0, metadata={"help": "sampling, option order and bootstrap seed"})
    out: Path | None = output_field(None, "run", "run folder (default outputs/bbq/<model>)")

    def validate(self) -> None:
        check_stage_flags(self, "per_category")


def main(cfg: Config) -> None:
    data = BBQ.load(cfg.data_dir, cfg.categories or None, cfg.per_category, cfg.seed)
    run_stage(BBQ, cfg, data, cfg.out or Path("outputs/bbq") / model_name(cfg.model), load=load_output, mode=cfg.mode,
              chat_template=cfg.chat_template, answer_norm=cfg.answer_norm)


if __name__ == "__main__":
    run_script(main, Config())
