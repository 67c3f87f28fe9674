"""``outputs/report.md``: every stage's results in one readable page, built from the files the stages wrote.

Tables carry the 95% bootstrap intervals the stages computed; before/after rows are paired comparisons on the
same held-out items (computed here from the stages' ``items.jsonl`` by each evaluation's ``compare``); one
section per evaluation of :data:`fairforget.evals.registry.EVALUATIONS` that the plan's stages write (its
``report_section``); plots are linked relatively; provenance (commit, packages, data hashes, commands, wall
times) closes the page. A stage that did not run is named as such, never filled in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from fairforget.artifacts import git_commit, package_versions, read_json, write_text
from fairforget.errors import FairforgetError
from fairforget.evals.bbq_eval import BBQ
from fairforget.evals.interface import Evaluation, Run
from fairforget.evals.registry import EVALUATIONS
from fairforget.markdown import ci_text, image, link, table
from fairforget.study.pipeline import StageResult
from fairforget.study.stage import Stage
from fairforget.run_folders import beside


class _Page:
    """Markdown being assembled, with image links relative to the report's folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self.parts.append(text.rstrip("\n") + "\n")

    def image(self, path: Path, caption: str) -> None:
        self.add(image(path, caption, self.folder))

    def link(self, path: Path, text: str) -> str:
        return link(path, text, self.folder)

    def text(self) -> str:
        return "\n".join(self.parts)


def _runs(evaluation: Evaluation, stages: Sequence[Stage], page: _Page) -> list[Run]:
    """The complete run folders of the stages that write ``evaluation`` (labelled by the stage name's last word);
    a folder that is incomplete or not in the run-folder schema is named on ``page`` as such and not read."""
    found = []
    for stage in stages:
        out = Path(stage.args.get("out") or stage.outputs[0])
        if stage.script != evaluation.script or not out.is_dir():
            continue
        try:
            found.append(evaluation.read_run(out, stage.name.split()[-1], stage.name))
        except FairforgetError as exc:
            page.add(f"{exc}; not read.\n")
    return found


def _evaluations(page: _Page, stages: Sequence[Stage]) -> None:
    """Each registered evaluation's section, for the evaluations these stages write."""
    for evaluation in EVALUATIONS.values():
        if any(stage.script == evaluation.script for stage in stages):
            page.add(evaluation.report_section(_runs(evaluation, stages, page), page.folder))


def _training(page: _Page, stages: Sequence[Stage]) -> None:
    for stage in stages:
        if stage.script == "11_finetune_lora.py":
            out = Path(stage.args["out"])
            summary = beside(out, "log") / "summary.json"
            if summary.is_file():
                s = read_json(summary)
                page.add(f"### LoRA fine-tuning\n\n{s['trainable_parameters']:,} LoRA parameters on "
                         f"{', '.join(s['targets'])}; {s['n_sentences']} WinoGender sentences, {s['steps']} steps. "
                         f"Mean NLL per token on them: {s['loss_before']:.4f} -> {s['loss_after']:.4f}.\n")
                page.image(beside(out, "log") / "loss.png", "LoRA loss")
        if stage.script == "12_pcgu_unlearn.py":
            log_dir = Path(stage.args["log_dir"])
            if (log_dir / "summary.json").is_file():
                s = read_json(log_dir / "summary.json")
                page.add(f"### PCGU\n\n{s['n_partitions']:,} partitions, k = {s['k']:,} updated per batch. Kept "
                         f"epoch {s['kept_epoch']}: {s['criterion']}.\n")
                page.add(table(["epoch", "selection SS [95% CI]", "LMS", "ICAT", "mean f(adv)-f(dis)",
                                 "adv preferred"],
                                [[e["epoch"], ci_text(e["ss"], e["ss_ci"]), f"{e['lms']:.2f}", f"{e['icat']:.2f}",
                                  f"{e['mean_gap']:+.4f}", f"{100 * e['share_adv_preferred']:.1f}%"]
                                 for e in s["epochs"]]))
                page.image(log_dir / "unlearning.png", "PCGU gap per step and selection SS per epoch")
        if stage.script == "14_compare_prompts.py":
            out = Path(stage.args["out"])
            if (out / "completions.md").is_file():
                page.add(f"### Prompt completions\n\nThe same prompts completed by each model (qualitative): "
                         f"{page.link(out / 'completions.md', 'completions.md')}.\n")


def _mitigation(page: _Page, stages: Sequence[Stage]) -> None:
    """Stage 22: its BBQ run folders (before, pruned, recovered) on the held-out scenarios, paired."""
    for stage in stages:
        if stage.script != "22_mitigate_heads.py":
            continue
        out = Path(stage.args["out"])
        page.add("### Head pruning and recovery (stage 22), held-out scenarios\n")
        if not (out / "metrics.json").is_file():
            page.add("Not run.\n")
            continue
        summary = read_json(out / "metrics.json")
        page.add(f"{summary['n_mitigation']} mitigation examples, {summary['n_held_out']} held-out examples from "
                 f"other scenarios; {summary['heads_pruned']} heads soft-pruned ({summary['heads_by_strength']} by "
                 f"strength), {len(summary.get('protected', []))} protected; recovery on "
                 f"{summary['n_recovery_examples']} mitigation examples of both conditions (gold \"unknown\" for "
                 f"ambiguous ones).\n")
        runs = [BBQ.read_run(out / name, name) for name in ("before", "pruned", "recovered")
                if (out / name / "items.jsonl").is_file()]
        if runs:
            page.add(BBQ.levels_table(runs, group="overall"))
            page.add(BBQ.paired_table(runs, overall_only=True))
        page.image(out / "stages_s_amb.png", "s_AMB by stage")
        page.image(out / "head_correlation.png", "head correlations and pruning strengths")


def _provenance(page: _Page, results: Sequence[StageResult], data_root: Path) -> None:
    page.add("## Provenance\n")
    versions = package_versions()
    page.add(f"fairforget commit `{git_commit()}`; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
    manifest = data_root / "MANIFEST.json"
    if manifest.is_file():
        data = read_json(manifest)
        files = data.get("files", []) if isinstance(data, dict) else data  # the fetch step's, or a mirror's list
        page.add(f"Data: {len(files)} files verified against their pinned sha256 "
                 f"({page.link(manifest, 'MANIFEST.json')}).\n\n<details><summary>files</summary>\n")
        page.add(table(["file", "sha256", "upstream"],
                        [[f["file"], f"`{f['sha256'][:16]}...`", f["upstream"]] for f in files]))
        page.add("</details>\n")
    page.add("Every results folder holds `metrics.json` with the full provenance block (resolved config, seed, "
             "package versions, data sha256, prompt template hashes) and `items.jsonl` with per-item scores.\n")
    page.add("Commands, in order:\n")
    page.add("```\n" + "\n".join(f"python {r.command}" for r in results if r.command) + "\n```\n")


def build_report(stages: Sequence[Stage], results: Sequence[StageResult], path: Path, title: str,
                 total_seconds: float, data_root: Path = Path("data")) -> str:
    """The report's markdown (also written to ``path``)."""
    page = _Page(Path(path).parent)
    page.add(f"# fairforget report: {title}\n")
    page.add(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total wall time of this run "
             f"{total_seconds / 60:.1f} min (stages skipped as up to date show their earlier time).\n")
    rows = [[r.name, r.status, f"{r.seconds:.0f}", r.note] for r in results]
    page.add(table(["stage", "status", "wall s", "note"], rows))
    for pipeline, heading in (("pcgu", "Pipeline 1: PCGU unlearning"), ("bbq", "Pipeline 2: BBQ and attention heads")):
        mine = [s for s in stages if s.pipeline == pipeline]
        if not mine:
            continue
        model = next((s.args["model"] for s in mine if "model" in s.args), "?")
        page.add(f"## {heading} ({model})\n")
        try:
            _evaluations(page, mine)
            (_training if pipeline == "pcgu" else _mitigation)(page, mine)
        except (FairforgetError, KeyError, ValueError) as exc:
            page.add(f"(part of this section could not be built from the stage outputs: {exc})\n")
    _provenance(page, results, data_root)
    text = page.text()
    write_text(path, text)
    return text
