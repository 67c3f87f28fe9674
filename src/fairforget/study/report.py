"""``outputs/report.md``: every stage's results in one readable page, built from the files the stages wrote.

It opens with "What this run found" (:mod:`fairforget.study.findings`: the largest paired change per bias measure
with its interval, p and capability cost, and every model that changed no held-out decision), then the stages.
Tables carry the 95% bootstrap intervals the stages computed; before/after rows are paired comparisons on the
same held-out items (computed here from the stages' ``items.jsonl`` by each evaluation's ``compare``); one
section per evaluation of :data:`fairforget.evals.registry.EVALUATIONS` that the plan's stages write (its
``report_section``); stage 22's controls (``controls.md``, the dose-response from its ``metrics.json``,
``dose_response.png``) and stage 30's ``summary.md`` and ``bias_vs_capability.png`` as those stages wrote them;
plots are linked relatively; provenance (commit, packages, data hashes, commands, wall
times) closes the page. A stage that did not run is named as such, never filled in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from fairforget.artifacts import git_commit, package_versions, read_json, write_text
from fairforget.errors import FairforgetError
from fairforget.evals.interface import Evaluation, Run
from fairforget.evals.registry import EVALUATIONS
from fairforget.markdown import ci_text, image, link, p_text, table
from fairforget.methods.head_controls import compare_choices
from fairforget.study.findings import Change, collect_changes, collect_shares, findings_block, stage_runs, unchanged
from fairforget.study.pipeline import StageResult
from fairforget.study.stage import Stage
from fairforget.run_folders import beside


class _Page:
    """Markdown being assembled, with image links relative to the report's folder."""

    def __init__(self, folder: Path, changes: Sequence[Change] = ()):
        self.folder = folder
        self.changes = changes  # every paired change of a bias measure (fairforget.study.findings), read once
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
    """The complete run folders of the stages that write ``evaluation``; a folder that is incomplete or not in
    the run-folder schema is named on ``page`` as such and not read."""
    found, problems = stage_runs(evaluation, stages)
    for problem in problems:
        page.add(problem + "\n")
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
                page.add("\n".join(line for line in unchanged(page.changes) if line.startswith("**debiased ")))
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
        page.add(f"### Head pruning and recovery ({stage.name}), held-out scenarios\n")
        if not (out / "metrics.json").is_file():
            page.add("Not run.\n")
            continue
        summary = read_json(out / "metrics.json")
        page.add(f"{summary['n_mitigation']} mitigation examples, {summary['n_held_out']} held-out examples from "
                 f"other scenarios; {summary['heads_pruned']} heads soft-pruned ({summary['heads_by_strength']} by "
                 f"strength), {len(summary.get('protected', []))} protected; recovery on "
                 f"{summary['n_recovery_examples']} mitigation examples of both conditions (gold \"unknown\" for "
                 f"ambiguous ones).\n")
        bbq = EVALUATIONS["bbq"]
        runs = [bbq.read_run(out / name, name) for name in ("before", "pruned", "recovered")
                if (out / name / "items.jsonl").is_file()]
        if runs:
            page.add(bbq.levels_table(runs, group="overall"))
            page.add(bbq.paired_table(runs, overall_only=True))
        page.image(out / "stages_s_amb.png", "s_AMB by stage")
        page.image(out / "head_correlation.png", "head correlations and pruning strengths")
        _controls(page, out, summary)


def _planted_mitigation(page: _Page, stages: Sequence[Stage]) -> None:
    """The controls plan's BBQ part: stage 22 on the planted and on the unplanted model, then whether the
    planted bias moved the head signal and the chosen heads (:func:`head_controls.compare_choices`)."""
    _mitigation(page, stages)
    outs = [Path(s.args["out"]) for s in stages if s.script == "22_mitigate_heads.py"]
    page.add("### Chosen heads: planted against unplanted model\n")
    if len(outs) != 2 or not all((o / "metrics.json").is_file() for o in outs):
        page.add("Not run: it needs stage 22 on both models.\n")
        return
    c = compare_choices(*outs)
    page.add(table(["", "planted model", "unplanted model"],
                   [["heads chosen", len(c["heads"][0]), len(c["heads"][1])],
                    ["chosen by both", len(c["common"]), len(c["common"])]]))
    page.add(f"Jaccard overlap of the chosen heads {c['jaccard']:.2f}; Spearman correlation of the two per-head signals "
             f"over all {c['n_heads']} heads {c['signal_spearman']:+.2f} (1: planting did not move the signal).\n")


def _controls(page: _Page, out: Path, summary: dict) -> None:
    """Stage 22's controls as it wrote them: ``controls.md`` (every variant, random heads and recovery only
    among them, paired against before; chosen minus random), the dose-response table from ``metrics.json``
    and ``dose_response.png``."""
    page.add("#### Controls: random heads, recovery only, chosen minus random (stage 22)\n")
    if not (out / "controls.md").is_file():
        page.add("Stage 22 wrote no controls.md in this run.\n")
        return
    page.add(f"Every variant on the same held-out items: before, the chosen heads pruned, random heads of the same "
             f"count and strengths, recovered, and recovery fine-tuning without pruning "
             f"({page.link(out / 'controls.md', 'controls.md')}, {page.link(out / 'controls.csv', 'controls.csv')}).\n")
    page.add((out / "controls.md").read_text())
    dose = summary.get("dose_response", [])
    if dose:
        page.add("#### Dose-response: held-out BBQ against the number of heads pruned\n")
        page.add(table(["k", "chosen s_AMB [95% CI]", "random s_AMB (mean of draws)", "chosen - random s_AMB [95% CI]",
                        "p", "chosen acc (disamb.) [95% CI]", "random acc (mean)", "chosen - random acc [95% CI]", "p"],
                       [_dose_row(entry) for entry in dose]))
    page.image(out / "dose_response.png", "dose-response: s_AMB and disambiguated accuracy against heads pruned")


def _dose_row(entry: dict) -> list:
    """One k of stage 22's dose-response: the chosen heads' point, the random draws' mean, their difference."""
    chosen, randoms, versus = entry["chosen"], entry["random"], entry.get("chosen_minus_random", {})
    cells = [entry["k"]]
    for key, digits in (("s_amb", 3), ("acc_disambig", 3)):
        values = [r[key] for r in randoms if r[key] is not None]  # JSON keeps an undefined (NaN) value as null
        mean = sum(values) / len(values) if values else None
        diff = versus.get(f"bbq_{key}")
        cells += [ci_text(chosen[key], chosen[f"{key}_ci"], digits, signed=key == "s_amb"),
                  "n/a" if mean is None else f"{mean:{'+' if key == 's_amb' else ''}.{digits}f} ({len(values)})",
                  "n/a" if diff is None else ci_text(diff["delta"], diff["ci"], digits, signed=True),
                  "n/a" if diff is None else p_text(diff["p"])]
    return cells


def _methods(page: _Page, stages: Sequence[Stage]) -> None:
    """Stage 30's comparison as it wrote it: ``summary.md`` (levels, paired changes) and its figure."""
    for stage in stages:
        if stage.script != "30_compare_methods.py":
            continue
        out = Path(stage.args["out"])
        if not (out / "summary.md").is_file():
            page.add("### Methods side by side (stage 30)\n\nNot run.\n")
            continue
        text = (out / "summary.md").read_text()
        page.add("\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()))
        shares = f"{page.link(out / 'shares.csv', 'shares.csv')}, " if (out / "shares.csv").is_file() else ""
        page.add(f"Files: {page.link(out / 'summary.csv', 'summary.csv')}, {shares}"
                 f"{page.link(out / 'paired.csv', 'paired.csv')}, {page.link(out / 'metrics.json', 'metrics.json')}.\n")
        page.image(out / "bias_vs_capability.png", "bias change against perplexity change, per method")


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
                 total_seconds: float, data_root: Path = Path("data"), machine: str = "") -> str:
    """The report's markdown (also written to ``path``; ``machine``: the fp32 matmul rates measured in the run,
    quoted beside its wall time)."""
    try:
        changes, shares, problem = collect_changes(stages), collect_shares(stages), ""
    except (FairforgetError, KeyError, ValueError) as exc:
        changes, shares, problem = [], [], f"## What this run found\n\n(could not be built from the stage outputs: {exc})\n"
    page = _Page(Path(path).parent, changes)
    page.add(f"# fairforget report: {title}\n")
    page.add(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total wall time of this run "
             f"{total_seconds / 60:.1f} min{f' ({machine})' if machine else ''} (stages skipped as up to date show "
             f"their earlier time).\n")
    page.add(problem or findings_block(changes, shares))
    rows = [[r.name, r.status, f"{r.seconds:.0f}", r.note] for r in results]
    page.add("## Stages\n")
    page.add(table(["stage", "status", "wall s", "note"], rows))
    for pipeline, heading, section in (("pcgu", "Pipeline 1: PCGU unlearning", _training),
                                       ("bbq", "Pipeline 2: BBQ and attention heads", _mitigation),
                                       ("methods", "Debiasing methods side by side", _methods),
                                       ("controls", "Positive controls: every method on a planted gender bias",
                                        _methods),
                                       ("controls_bbq", "Positive control: head pruning on a planted BBQ bias",
                                        _planted_mitigation)):
        mine = [s for s in stages if s.pipeline == pipeline]
        if not mine:
            continue
        model = next((s.args[key] for s in mine for key in ("model", "before") if key in s.args), "?")
        page.add(f"## {heading} ({model})\n")
        try:
            _evaluations(page, mine)
            section(page, mine)
        except (FairforgetError, KeyError, ValueError) as exc:
            page.add(f"(part of this section could not be built from the stage outputs: {exc})\n")
    _provenance(page, results, data_root)
    text = page.text()
    write_text(path, text)
    return text
