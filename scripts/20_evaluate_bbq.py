"""Stage 20: BBQ by category: accuracy, s_DIS and s_AMB with bootstrap 95% intervals.

    python scripts/20_evaluate_bbq.py --model embedded:smollm2-135m-instruct --per-category 50
    python scripts/20_evaluate_bbq.py --model M --mode answer --categories Age Religion --out outputs/bbq/M-answer

Multiple-choice prompt (context, question, options A/B/C in a seeded per-item order, "Answer:"), in the
model's chat template when it has one (--chat-template auto). --mode letter: the option letter with the
highest next-token probability (bare and space-prefixed letter tokens summed); --mode answer: each answer
text's log-likelihood after the prompt (per-token mean by default, --answer-norm sum), the prompt computed
once for its three options. Bias scores as in Parrish et al. 2022 (see fairforget.evals.bbq_metrics).
Writes metrics.json (per category and overall, provenance, exclusions), metrics.csv, items.jsonl,
bias_scores.txt and bias_scores.png to --out (default outputs/bbq/<model>/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget import distributed
from fairforget.artifacts import provenance, sha256_text
from fairforget.run_folders import check_run_target
from fairforget.evals.bbq import CATEGORIES, load_bbq, sample_per_category
from fairforget.evals.bbq_eval import PROMPT_TEMPLATE, QUESTION_ONLY_TEMPLATE, evaluate_bbq, write_bbq_run
from fairforget.evals.bbq_metrics import format_table
from fairforget.config import run_script
from fairforget.errors import FairforgetError
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name

Category = Literal[CATEGORIES]  # type: ignore[valid-type]


@dataclass
class Config:
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
    n_boot: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str = "auto"
    out: Path | None = field(default=None, metadata={"help": "run folder (default outputs/bbq/<model>)"})

    def validate(self) -> None:
        if self.per_category is not None and self.per_category < 1:
            raise FairforgetError(f"--per-category must be at least 1, got {self.per_category}")
        if self.batch_size < 1:
            raise FairforgetError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.n_boot < 1:
            raise FairforgetError(f"--n-boot must be at least 1, got {self.n_boot}")


def main(cfg: Config) -> None:
    distributed.init(cfg.device)  # under torchrun / accelerate launch: batches sharded, same results
    data = load_bbq(cfg.data_dir, cfg.categories or None)
    examples = sample_per_category(data.examples, cfg.per_category, cfg.seed)
    out = check_run_target(cfg.out or Path("outputs/bbq") / model_name(cfg.model))
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    print(f"evaluating {len(examples)} BBQ examples ({cfg.mode} mode) with {loaded.source}", flush=True)
    start = time.time()
    metrics, items = evaluate_bbq(loaded.model, loaded.tokenizer, examples, cfg.mode, cfg.chat_template,
                                  cfg.batch_size, cfg.n_boot, cfg.seed, cfg.answer_norm)
    seconds = time.time() - start
    chat = metrics["chat_template"]
    chat_source = loaded.tokenizer.chat_template if chat else None
    metrics["excluded_na"] = data.excluded_na
    metrics["duplicate_metadata_keys_dropped"] = data.duplicate_metadata_keys
    block = provenance(
        cfg, data.files, model_source=loaded.source, device=str(loaded.device), batch_size=cfg.batch_size,
        wall_seconds=round(seconds, 1), n_examples=len(examples),
        prompt_template=PROMPT_TEMPLATE, prompt_template_sha256=sha256_text(PROMPT_TEMPLATE),
        question_only_template_sha256=sha256_text(QUESTION_ONLY_TEMPLATE), chat_template=chat,
        chat_template_sha256=sha256_text(chat_source) if chat_source else None,
        scoring=("letter: p(letter)+p(' '+letter) of the next token, renormalised over A/B/C" if cfg.mode == "letter"
                 else f"answer: log-likelihood of ' '+answer text (no space after a chat turn), "
                      f"choice by {cfg.answer_norm}; shared prompt computation"))
    write_bbq_run(out, metrics, items, block)
    print(format_table(metrics), end="")
    print(f"excluded (target_loc NA): {sum(data.excluded_na.values())}; "
          f"{len(examples)} examples in {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    run_script(main, Config())
