"""Stage 13: StereoSet SS / LMS / ICAT (intra- and intersentence, per domain) with bootstrap 95% intervals.

    python scripts/13_evaluate_stereoset.py --model embedded:smollm2-135m-instruct [--limit N] [--half heldout]
    python scripts/13_evaluate_stereoset.py --model models/debiased --half heldout \\
        --compare-to outputs/stereoset/smollm2-135m-instruct-heldout

Writes metrics.json (metrics[split][domain][metric], plus provenance), metrics.csv, items.jsonl (one line per
scored sentence), ss_by_domain.png, and with --compare-to a paired comparison (comparison.json / .md).
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
from fairforget.errors import FairforgetError
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.plots import interval_bars
from fairforget.progress import set_quiet
from fairforget.evals.stereoset import (DOMAINS, SCORING_NOTE, SPLITS, compare_runs, evaluate_stereoset, load_stereoset,
                                  select_half, stratified_limit)


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    data: Path = Path("data/stereoset/dev.json")
    half: Literal["all", "selection", "heldout"] = field(
        default="all", metadata={"help": "seeded half of dev: selection (for checkpoint choice) or heldout"})
    half_seed: int = 0
    limit: int | None = field(default=None, metadata={"help": "stratified sample of about N examples"})
    seed: int = 0
    batch_size: int = 32
    n_boot: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    dtype: str = "auto"
    out: Path | None = field(default=None, metadata={"help": "run folder (default outputs/stereoset/<model>[-half])"})
    compare_to: Path | None = field(default=None, metadata={"help": "earlier run folder for a paired comparison"})

    def validate(self) -> None:
        if self.batch_size < 1:
            raise FairforgetError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.n_boot < 1:
            raise FairforgetError(f"--n-boot must be at least 1, got {self.n_boot}")
        if self.limit is not None and self.limit < 1:
            raise FairforgetError(f"--limit must be at least 1 (or none for every example), got {self.limit}")
        if self.compare_to is not None:
            require_complete_run(self.compare_to, "--compare-to")


def default_out(cfg: Config) -> Path:
    suffix = "" if cfg.half == "all" else f"-{cfg.half}"
    return Path("outputs/stereoset") / f"{model_name(cfg.model)}{suffix}"


def metrics_rows(metrics: dict) -> list[dict]:
    rows = []
    for split, domains in metrics.items():
        for domain, m in domains.items():
            row = {"split": split, "domain": domain, "n": m["n"]}
            for name in ("ss", "lms", "icat", "ss_micro"):
                row[name] = round(m[name], 3)
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (round(v, 3) for v in m[f"{name}_ci"])
            rows.append(row)
    return rows


def comparison_markdown(comparison: dict, before: Path, after: str) -> str:
    lines = [f"# StereoSet paired comparison\n", f"before: `{before}`  \nafter: `{after}`  \n"
             f"examples in common: {comparison['n_common']}\n",
             "| split | SS micro before | SS micro after | change [95% CI] | stereo->anti | anti->stereo | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for split in (*SPLITS, "overall"):
        if split in comparison:
            c = comparison[split]
            lo, hi = c["delta_ss_micro_ci"]
            lines.append(f"| {split} | {c['ss_micro_before']:.2f} | {c['ss_micro_after']:.2f} | "
                         f"{c['delta_ss_micro']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {c['true_before_only']} | "
                         f"{c['true_after_only']} | {c['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    distributed.init(cfg.device)  # under torchrun / accelerate launch: batches sharded, same results
    examples = stratified_limit(select_half(load_stereoset(cfg.data), cfg.half, cfg.half_seed), cfg.limit, cfg.seed)
    if not examples:
        raise FairforgetError(f"no StereoSet examples to score: {cfg.data} has none"
                              + ("" if cfg.half == "all" else f" in its {cfg.half} half")
                              + "; nothing was written")
    out = check_run_target(cfg.out or default_out(cfg))
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    print(f"scoring {len(examples)} StereoSet examples ({3 * len(examples)} sentences) with {loaded.source}")
    start = time.time()
    metrics, items = evaluate_stereoset(loaded.model, loaded.tokenizer, examples, cfg.batch_size, cfg.n_boot,
                                        cfg.seed)
    seconds = time.time() - start
    counts = {f"{split}/{domain}": m["n"] for split, domains in metrics.items() for domain, m in domains.items()}
    warnings = small_n_warnings(counts, "StereoSet")
    with run_folder(out) as tmp:  # the whole folder is swapped in at the end: never half old, half new
        write_jsonl(tmp / "items.jsonl", items)
        write_csv(tmp / "metrics.csv", metrics_rows(metrics))
        for split in metrics:
            domains = [d for d in (*DOMAINS, "all") if d in metrics[split]]
            interval_bars(tmp / f"ss_by_domain_{split}.png", domains,
                          {"SS": ([metrics[split][d]["ss"] for d in domains],
                                  [metrics[split][d]["ss_ci"] for d in domains])},
                          f"StereoSet SS ({split}), {loaded.name}", "SS (macro over targets)", reference=50.0)
        if cfg.compare_to is not None:
            comparison = compare_runs(read_jsonl(cfg.compare_to / "items.jsonl"), items, cfg.n_boot, cfg.seed)
            write_json(tmp / "comparison.json", {"before": str(cfg.compare_to), "after": str(out), **comparison})
            write_text(tmp / "comparison.md", comparison_markdown(comparison, cfg.compare_to, str(out)))
        metrics["provenance"] = provenance(
            cfg, [cfg.data], model_source=loaded.source, scoring=SCORING_NOTE, n_examples=len(examples),
            batch_size=cfg.batch_size, wall_seconds=round(seconds, 1), device=str(loaded.device),
            conditioning_token=loaded.tokenizer.convert_ids_to_tokens(
                loaded.tokenizer.bos_token_id if loaded.tokenizer.bos_token_id is not None
                else loaded.tokenizer.eos_token_id), warnings=warnings)
        write_json(tmp / "metrics.json", metrics)
    overall = metrics["overall"]["all"]
    print(f"overall SS {overall['ss']:.2f} [{overall['ss_ci'][0]:.2f}, {overall['ss_ci'][1]:.2f}]  "
          f"LMS {overall['lms']:.2f} [{overall['lms_ci'][0]:.2f}, {overall['lms_ci'][1]:.2f}]  "
          f"ICAT {overall['icat']:.2f} [{overall['icat_ci'][0]:.2f}, {overall['icat_ci'][1]:.2f}]  "
          f"({seconds:.0f} s) -> {out}")


if __name__ == "__main__":
    run_script(main, Config())
