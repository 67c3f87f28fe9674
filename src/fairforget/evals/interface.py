"""One interface for every evaluation: load, evaluate, compare, one run-folder schema, a report section.

Each evaluation (StereoSet, CrowS-Pairs, BBQ) is a subclass of :class:`Evaluation`, registered in
:data:`fairforget.evals.registry.EVALUATIONS`. Every run folder one writes (:func:`write_eval_run`, swapped in
whole with its completion marker by :func:`fairforget.run_folders.run_folder`) has the same schema:

    metrics.json     {"evaluation": name, "metrics": {...}, "provenance": {...}}
    items.jsonl      one record per scored item: what ``compare`` pairs two runs on
    metrics.csv      one flat row per group, beside the evaluation's plots (its ``write_files``)
    comparison.json  with a run to compare to: {"evaluation", "before", "after", "comparison": {...}}
    comparison.md    the same comparison as a table

:func:`run_stage` is the body the evaluation stages (13, 15, 20) share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fairforget import distributed
from fairforget.artifacts import read_json, read_jsonl, small_n_warnings, write_json, write_jsonl, write_text
from fairforget.provenance import provenance
from fairforget.errors import FairforgetError
from fairforget.markdown import pairs, table
from fairforget.models import load_model
from fairforget.progress import set_quiet
from fairforget.run_folders import check_run_target, require_complete_run, run_folder

SCHEMA_KEYS = ("evaluation", "metrics", "provenance")


@dataclass(frozen=True)
class Examples:
    """What ``load`` returns: the examples to score, the data files they came from, and notes on the data
    (e.g. BBQ's excluded rows) kept beside the metrics."""

    examples: list
    files: list[Path]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """A complete run folder read back: its label in a report, the folder, and metrics.json's two blocks."""

    label: str
    folder: Path
    metrics: dict
    provenance: dict


class Evaluation:
    """What every evaluation implements; the shared writing, reading and comparison tables are defined here."""

    name: str = ""  # the registry key, written as metrics.json's "evaluation"
    title: str = ""  # its name in headings and messages
    script: str = ""  # the stage script that writes its run folders (the report finds its stages by it)
    item_fields: tuple[str, ...] = ()  # what every line of items.jsonl must hold
    comparison_note: str = ""  # what the paired-comparison table shows, for the report
    report_heading: str = ""  # the report section's heading when no run exists
    report_overall_only: bool = False  # the report's paired table shows only the overall row

    def load(self, path: Path | str, **options: Any) -> Examples:
        """The (seeded, sampled) examples to score from the data at ``path``; bad rows raise FairforgetError."""
        raise NotImplementedError

    def evaluate(self, model: Any, tokenizer: Any, examples: Sequence, **options: Any) -> tuple[dict, list[dict]]:
        """Score ``examples``: (metrics with 95% intervals, per-item records). Options include batch_size,
        n_boot and seed."""
        raise NotImplementedError

    def compare(self, before: Sequence[dict], after: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
        """Paired comparison of two runs' items on the items they share (paired bootstrap, McNemar)."""
        raise NotImplementedError

    def group_sizes(self, metrics: dict) -> dict[str, int]:
        """Items per reported group (small groups are warned about)."""
        raise NotImplementedError

    def write_files(self, folder: Path, metrics: dict, label: str) -> None:
        """metrics.csv and the plots of one run into ``folder`` (``label`` names the model in titles)."""
        raise NotImplementedError

    def provenance_notes(self, tokenizer: Any, metrics: dict, options: dict) -> dict:
        """What the provenance block records about the scoring (rule, prompt hashes)."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> str:
        """The run's main numbers, printed when a stage finishes."""
        raise NotImplementedError

    def comparison_rows(self, comparison: dict, overall_only: bool = False) -> tuple[list[str], list[list]]:
        """(header, rows) of the paired-comparison table; only the overall row with ``overall_only``."""
        raise NotImplementedError

    def report_levels(self, runs: Sequence[Run], folder: Path) -> str:
        """The report's heading, definitions and level tables (with intervals) of one or more runs."""
        raise NotImplementedError

    def report_plots(self, runs: Sequence[Run], folder: Path) -> str:
        """Image links (relative to ``folder``) closing the report section."""
        return ""

    # ---- shared by every evaluation ----

    def report_section(self, runs: Sequence[Run], folder: Path) -> str:
        """This evaluation's section of the report: its levels, the runs paired from their items, its plots."""
        if not runs:
            return f"### {self.report_heading}\n\nNot run.\n"
        parts = (self.report_levels(runs, folder), self.paired_table(runs, self.report_overall_only),
                 self.report_plots(runs, folder))
        return "\n".join(part for part in parts if part)

    def write_run(self, out: Path | str, metrics: dict, items: Sequence[dict], provenance_block: dict,
                  label: str = "", comparison: tuple[Path, dict] | None = None) -> None:
        write_eval_run(out, self, metrics, items, provenance_block, label, comparison)

    def read_run(self, folder: Path | str, label: str = "", what: str = "run folder") -> Run:
        """A complete run folder of this evaluation; one FairforgetError saying why otherwise."""
        folder = require_complete_run(folder, what)
        data = read_json(folder / "metrics.json", f"{self.title} metrics")
        if not isinstance(data, dict) or any(k not in data for k in SCHEMA_KEYS):
            raise FairforgetError(f"{what} {folder}: metrics.json does not have the run-folder schema "
                                  f"({', '.join(SCHEMA_KEYS)}); it was written by an older fairforget, run its stage "
                                  f"again")
        if data["evaluation"] != self.name:
            raise FairforgetError(f"{what} {folder} is a {data['evaluation']!r} run, not {self.name!r}")
        return Run(label, folder, data["metrics"], data["provenance"])

    def read_items(self, folder: Path | str) -> list[dict]:
        """The items of a finished run (``items.jsonl`` in ``folder``), each checked for ``item_fields``."""
        path = Path(folder) / "items.jsonl"
        items = read_jsonl(path, f"{self.title} items file")
        for line, item in enumerate(items, start=1):
            missing = [k for k in self.item_fields if k not in item]
            if missing:
                raise FairforgetError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
        return items

    def comparison_markdown(self, comparison: dict, before: Path | str, after: Path | str) -> str:
        header, rows = self.comparison_rows(comparison)
        return (f"# {self.title} paired comparison\n\nbefore: `{before}`  \nafter: `{after}`  \n"
                f"items in common: {comparison_size(comparison)}\n\n" + table(header, rows))

    def paired_table(self, runs: Sequence[Run], overall_only: bool = False) -> str:
        """Each run paired with the one before it (and the last with the first), from their items."""
        items = {run.label: self.read_items(run.folder) for run in runs}
        header, rows = [], []
        for before, after in pairs(list(items)):
            header, found = self.comparison_rows(self.compare(items[before], items[after]), overall_only)
            rows += [[f"{before} -> {after}", *row] for row in found]
        if not rows:
            return ""
        return f"Paired comparisons on the same items ({self.comparison_note}):\n\n" + table(["comparison", *header],
                                                                                            rows)


def comparison_size(comparison: dict) -> int:
    """How many items two runs shared (``n_common``, or the overall group's ``n``)."""
    return comparison.get("n_common", comparison.get("overall", {}).get("n", 0))


def write_eval_run(out: Path | str, evaluation: Evaluation, metrics: dict, items: Sequence[dict],
                   provenance_block: dict, label: str = "", comparison: tuple[Path, dict] | None = None) -> None:
    """Write one run folder in the shared schema (module docstring), swapped in whole with its marker.
    ``comparison`` is (the earlier run's folder, ``evaluation.compare(...)`` of it against these items)."""
    out = Path(out)
    with run_folder(out) as tmp:  # never half old, half new
        write_jsonl(tmp / "items.jsonl", items)
        evaluation.write_files(tmp, metrics, label)
        if comparison is not None:
            before, result = comparison
            write_json(tmp / "comparison.json", {"evaluation": evaluation.name, "before": str(before),
                                                 "after": str(out), "comparison": result})
            write_text(tmp / "comparison.md", evaluation.comparison_markdown(result, before, out))
        write_json(tmp / "metrics.json", {"evaluation": evaluation.name, "metrics": metrics,
                                          "provenance": provenance_block})


def check_stage_flags(cfg: Any, size_flag: str = "limit") -> None:
    """The flags every evaluation stage shares: --batch-size, --n-boot and the sample size at least 1, and
    --compare-to a complete run folder."""
    for flag, value in (("batch_size", cfg.batch_size), ("n_boot", cfg.n_boot), (size_flag, getattr(cfg, size_flag))):
        if value is not None and value < 1:
            raise FairforgetError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if cfg.compare_to is not None:
        require_complete_run(cfg.compare_to, "--compare-to")


def run_stage(evaluation: Evaluation, cfg: Any, data: Examples, out: Path, load: Callable = load_model,
              **options: Any) -> tuple[dict, list[dict]]:
    """An evaluation stage after loading its data: refuse a bad --out or --compare-to before any work, load
    --model with ``load`` (the stages pass the method registry's ``load_output``, which opens scoring wrappers
    too), evaluate (``cfg.batch_size``, ``n_boot``, ``seed`` and ``options``), compare with --compare-to,
    write the run folder with provenance, print the headline. Returns (metrics, items)."""
    set_quiet(getattr(cfg, "quiet", False))
    distributed.init(cfg.device)  # under torchrun / accelerate launch: batches sharded, same results
    out = check_run_target(out)
    before = evaluation.read_run(cfg.compare_to, what="--compare-to") if cfg.compare_to is not None else None
    loaded = load(cfg.model, cfg.device, cfg.dtype)
    print(f"evaluating {len(data.examples)} {evaluation.title} examples with {loaded.source}", flush=True)
    start = time.time()
    metrics, items = evaluation.evaluate(loaded.model, loaded.tokenizer, data.examples, batch_size=cfg.batch_size,
                                         n_boot=cfg.n_boot, seed=cfg.seed, **options)
    seconds = time.time() - start
    metrics.update(data.notes)
    block = provenance(cfg, data.files, model_source=loaded.source, device=str(loaded.device),
                       batch_size=cfg.batch_size, wall_seconds=round(seconds, 1), n_examples=len(data.examples),
                       warnings=small_n_warnings(evaluation.group_sizes(metrics), evaluation.title),
                       **evaluation.provenance_notes(loaded.tokenizer, metrics, options))
    comparison = None
    if before is not None:
        comparison = (before.folder, evaluation.compare(evaluation.read_items(before.folder), items, cfg.n_boot,
                                                        cfg.seed))
    evaluation.write_run(out, metrics, items, block, loaded.name, comparison)
    print(f"{evaluation.headline(metrics)}\n{len(data.examples)} examples in {seconds:.0f} s -> {out}")
    if comparison is not None:
        print(f"paired with {before.folder} ({out / 'comparison.md'}):\n"
              + table(*evaluation.comparison_rows(comparison[1], overall_only=True)), end="")
    return metrics, items
