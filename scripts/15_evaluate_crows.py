"""Stage 15: CrowS-Pairs for causal LMs, per bias type and overall, with bootstrap 95% intervals.

    python scripts/15_evaluate_crows.py --model embedded:smollm2-135m-instruct [--limit N]
    python scripts/15_evaluate_crows.py --model models/debiased --compare-to outputs/crows/finetuned_lora

The metric is the share of pairs (x100) where the more-stereotyping sentence (``sent_more`` for stereo pairs,
``sent_less`` for antistereo pairs) has the higher full-sentence log-likelihood; 50 is ideal. Writes
metrics.json (with provenance and the scoring choice), metrics.csv, items.jsonl, crows_by_bias_type.png to
``outputs/crows/<model>/``, and with ``--compare-to`` a paired comparison (comparison.json / .md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget import distributed
from fairforget.artifacts import (provenance, read_jsonl, small_n_warnings, write_csv, write_json, write_jsonl,
                                  write_text)
from fairforget.run_folders import check_run_target, require_complete_run, run_folder
from fairforget.config import run_script
from fairforget.evals.crows import compare_runs, compute_metrics, load_crows, sample_pairs, score_pairs, scoring_note
from fairforget.errors import FairforgetError
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.plots import interval_bars
from fairforget.progress import set_quiet


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    data: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    score: Literal["sum", "mean"] = field(default="sum", metadata={"help": "sentence log-likelihood: sum or mean"})
    limit: int | None = field(default=None, metadata={"help": "seeded sample of about N pairs, per bias type"})
    seed: int = 0
    batch_size: int = 32
    n_boot: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    dtype: str = "auto"
    out: Path | None = field(default=None, metadata={"help": "run folder (default outputs/crows/<model>)"})
    compare_to: Path | None = field(default=None, metadata={"help": "earlier run folder for a paired comparison"})

    def validate(self) -> None:
        if self.batch_size < 1 or self.n_boot < 1:
            raise FairforgetError("--batch-size and --n-boot must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise FairforgetError(f"--limit must be at least 1 (or none for every pair), got {self.limit}")
        if self.compare_to is not None:
            require_complete_run(self.compare_to, "--compare-to")


def comparison_markdown(comparison: dict, before: Path, after: str) -> str:
    lines = ["# CrowS-Pairs paired comparison\n", f"before: `{before}`  \nafter: `{after}`  \n"
             f"pairs in common: {comparison['n_common']}\n",
             "| group | before | after | change [95% CI] | stereo-preferred only before | only after | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for name, c in comparison.items():
        if isinstance(c, dict):
            lo, hi = c["delta_ci"]
            lines.append(f"| {name} | {c['metric_before']:.2f} | {c['metric_after']:.2f} | {c['delta']:+.2f} "
                         f"[{lo:+.2f}, {hi:+.2f}] | {c['true_before_only']} | {c['true_after_only']} | "
                         f"{c['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    distributed.init(cfg.device)  # under torchrun / accelerate launch: batches sharded, same results
    out = check_run_target(cfg.out or Path("outputs/crows") / model_name(cfg.model))
    pairs = sample_pairs(load_crows(cfg.data), cfg.limit, cfg.seed)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    start = time.perf_counter()
    items = score_pairs(loaded.model, loaded.tokenizer, pairs, cfg.batch_size, cfg.score)
    seconds = time.perf_counter() - start
    metrics = compute_metrics(items, cfg.n_boot, cfg.seed)
    warnings = small_n_warnings({g: m["n"] for g, m in metrics.items()}, "CrowS-Pairs")
    comparison = (compare_runs(read_jsonl(cfg.compare_to / "items.jsonl"), items, cfg.n_boot, cfg.seed)
                  if cfg.compare_to is not None else None)
    with run_folder(out) as tmp:  # the whole folder is swapped in at the end: never half old, half new
        write_jsonl(tmp / "items.jsonl", items)
        write_csv(tmp / "metrics.csv", [{"group": g, "n": m["n"], "metric": round(m["metric"], 3),
                                         "ci_low": round(m["metric_ci"][0], 3), "ci_high": round(m["metric_ci"][1], 3)}
                                        for g, m in metrics.items()])
        write_json(tmp / "metrics.json", {"model": cfg.model, "n_pairs": len(items),
                                          "score_seconds": round(seconds, 1), "metrics": metrics,
                                          "provenance": provenance(cfg, [cfg.data], scoring=scoring_note(cfg.score),
                                                                   warnings=warnings)})
        groups = [g for g in metrics if not g.startswith("direction:")]
        interval_bars(tmp / "crows_by_bias_type.png", groups,
                      {model_name(cfg.model): ([metrics[g]["metric"] for g in groups],
                                               [metrics[g]["metric_ci"] for g in groups])},
                      "CrowS-Pairs: stereotyping sentence preferred (%)", "% of pairs", reference=50)
        if comparison is not None:
            write_json(tmp / "comparison.json", {"before": str(cfg.compare_to), "after": str(out), **comparison})
            write_text(tmp / "comparison.md", comparison_markdown(comparison, cfg.compare_to, str(out)))
    o = metrics["overall"]
    print(f"CrowS-Pairs {loaded.name}: {o['metric']:.2f} [{o['metric_ci'][0]:.2f}, {o['metric_ci'][1]:.2f}] "
          f"on {o['n']} pairs ({seconds:.0f} s) -> {out}")
    if comparison is not None:
        c = comparison["overall"]
        print(f"paired vs {cfg.compare_to}: {c['metric_before']:.2f} -> {c['metric_after']:.2f} "
              f"({c['delta']:+.2f} [{c['delta_ci'][0]:+.2f}, {c['delta_ci'][1]:+.2f}], McNemar p {c['p_value']:.3g})")

if __name__ == "__main__":
    run_script(main, Config())
