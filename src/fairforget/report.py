"""``outputs/report.md``: every stage's results in one readable page, built from the files the stages wrote.

Tables carry the 95% bootstrap intervals the stages computed; before/after rows are paired comparisons on the
same held-out items (computed here from the stages' ``items.jsonl`` with the evaluation modules' own
``compare_runs``); plots are linked relatively; provenance (commit, packages, data hashes, commands, wall
times) closes the page. A stage that did not run is named as such, never filled in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from fairforget.artifacts import git_commit, package_versions, read_json, read_jsonl, write_text
from fairforget.run_folders import run_problem
from fairforget.errors import FairforgetError
from fairforget.pipeline import ATOMIC_RUN_SCRIPTS, Stage, StageResult


def _ci(value: float, interval: Sequence[float] | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or value != value:
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if not interval or any(v is None or v != v for v in interval):
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def _p(value: float) -> str:
    return f"{value:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class _Page:
    """Markdown being assembled, with image links relative to the report's folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip("\n") + "\n")

    def image(self, path: Path, caption: str) -> None:
        if Path(path).is_file():
            self.add(f"![{caption}]({os.path.relpath(path, self.folder)})")

    def link(self, path: Path, text: str) -> str:
        return f"[{text}]({os.path.relpath(path, self.folder)})"

    def text(self) -> str:
        return "\n".join(self.parts)


def _runs(stages: Sequence[Stage], script: str, page: _Page | None = None) -> list[tuple[str, Stage, Path]]:
    """(label, stage, run folder) of the stages of ``script`` whose results exist; a run folder that is not
    complete (stages in ATOMIC_RUN_SCRIPTS) is named on ``page`` as such and not read."""
    found = []
    for stage in stages:
        out = Path(stage.args.get("out") or stage.outputs[0])
        if stage.script != script or not out.is_dir():
            continue
        problem = run_problem(out) if script in ATOMIC_RUN_SCRIPTS else None
        if problem and page is not None:
            page.add(f"{stage.name}: `{out}` is {problem}; not read.\n")
        elif not problem and (out / "metrics.json").is_file():
            found.append((stage.name.split()[-1], stage, out))
    return found


def _pairs(labels: list[str]) -> list[tuple[str, str]]:
    """Each run against the one before it, and the last against the first."""
    pairs = list(zip(labels, labels[1:]))
    if len(labels) > 2:
        pairs.append((labels[0], labels[-1]))
    return pairs


def _stereoset(page: _Page, stages: Sequence[Stage]) -> None:
    from fairforget.evals.stereoset import DOMAINS, compare_runs

    page.add("### StereoSet (held-out half of dev)\n")
    runs = _runs(stages, "13_evaluate_stereoset.py", page)
    if not runs:
        page.add("Not run.\n")
        return
    metrics = {label: read_json(out / "metrics.json") for label, _, out in runs}
    first = next(iter(metrics.values()))
    n = first["overall"]["all"]["n"]
    page.add(f"SS: share of examples (macro over target terms) where the stereotype scores above the "
             f"anti-stereotype (ideal 50); LMS: related above unrelated (ideal 100); ICAT = LMS * min(SS, 100-SS)/50. "
             f"{n} examples, intra- and intersentence; 95% bootstrap intervals over examples.\n")
    rows = []
    for label, m in metrics.items():
        o = m["overall"]["all"]
        rows.append([label, o["n"], _ci(o["ss"], o["ss_ci"]), _ci(o["lms"], o["lms_ci"]), _ci(o["icat"], o["icat_ci"]),
                     _ci(o["ss_micro"], o["ss_micro_ci"])])
    page.add(_table(["model", "n", "SS", "LMS", "ICAT", "SS (micro)"], rows))
    domains = [d for d in DOMAINS if d in first["overall"]]
    page.add("SS by domain (both splits):\n")
    page.add(_table(["model", *domains], [[label, *[_ci(m["overall"][d]["ss"], m["overall"][d]["ss_ci"], 1)
                                                    for d in domains]] for label, m in metrics.items()]))
    items = {label: read_jsonl(out / "items.jsonl") for label, _, out in runs}
    rows = []
    for before, after in _pairs(list(items)):
        c = compare_runs(items[before], items[after])
        for split in ("overall", "intrasentence", "intersentence"):
            if split in c:
                s = c[split]
                rows.append([f"{before} -> {after}", split, s["n"], f"{s['ss_micro_before']:.2f}",
                             f"{s['ss_micro_after']:.2f}",
                             _ci(s["delta_ss_micro"], s["delta_ss_micro_ci"], signed=True),
                             f"{s['true_before_only']} / {s['true_after_only']}", _p(s["p_value"])])
    if rows:
        page.add("Paired comparisons on the same examples (micro SS; stereotype-preferred decisions that flipped "
                 "each way; McNemar exact test):\n")
        page.add(_table(["comparison", "split", "n", "SS before", "SS after", "change [95% CI]",
                         "stereo->anti / anti->stereo", "p"], rows))
    for label, _, out in runs:
        page.image(out / "ss_by_domain_overall.png", f"StereoSet SS by domain, {label}")


def _crows(page: _Page, stages: Sequence[Stage]) -> None:
    from fairforget.evals.crows import compare_runs

    page.add("### CrowS-Pairs\n")
    runs = _runs(stages, "15_evaluate_crows.py", page)
    if not runs:
        page.add("Not run.\n")
        return
    metrics = {label: read_json(out / "metrics.json")["metrics"] for label, _, out in runs}
    groups = [g for g in next(iter(metrics.values())) if not g.startswith("direction:")]
    page.add("Share of pairs (%) where the more stereotyping sentence has the higher log-likelihood (ideal 50), "
             "with 95% bootstrap intervals.\n")
    page.add(_table(["group", *metrics], [[f"{g} (n={next(iter(metrics.values()))[g]['n']})",
                                          *[_ci(m[g]["metric"], m[g]["metric_ci"], 1) if g in m else "n/a"
                                            for m in metrics.values()]] for g in groups]))
    items = {label: read_jsonl(out / "items.jsonl") for label, _, out in runs}
    rows = []
    for before, after in _pairs(list(items)):
        c = compare_runs(items[before], items[after])["overall"]
        rows.append([f"{before} -> {after}", c["n"], f"{c['metric_before']:.1f}", f"{c['metric_after']:.1f}",
                     _ci(c["delta"], c["delta_ci"], 1, signed=True), _p(c["p_value"])])
    if rows:
        page.add("Paired comparisons (same pairs, McNemar exact test):\n")
        page.add(_table(["comparison", "n", "before", "after", "change [95% CI]", "p"], rows))
    page.image(runs[-1][2] / "crows_by_bias_type.png", f"CrowS-Pairs by bias type, {runs[-1][0]}")


def _training(page: _Page, stages: Sequence[Stage]) -> None:
    for stage in stages:
        if stage.script == "11_finetune_lora.py":
            out = Path(stage.args["out"])
            summary = out.parent / f"{out.name}_log" / "summary.json"
            if summary.is_file():
                s = read_json(summary)
                page.add(f"### LoRA fine-tuning\n\n{s['trainable_parameters']:,} LoRA parameters on "
                         f"{', '.join(s['targets'])}; {s['n_sentences']} WinoGender sentences, {s['steps']} steps. "
                         f"Mean NLL per token on them: {s['loss_before']:.4f} -> {s['loss_after']:.4f}.\n")
                page.image(out.parent / f"{out.name}_log" / "loss.png", "LoRA loss")
        if stage.script == "12_pcgu_unlearn.py":
            log_dir = Path(stage.args["log_dir"])
            if (log_dir / "summary.json").is_file():
                s = read_json(log_dir / "summary.json")
                page.add(f"### PCGU\n\n{s['n_partitions']:,} partitions, k = {s['k']:,} updated per batch. Kept "
                         f"epoch {s['kept_epoch']}: {s['criterion']}.\n")
                page.add(_table(["epoch", "selection SS [95% CI]", "LMS", "ICAT", "mean f(adv)-f(dis)",
                                 "adv preferred"],
                                [[e["epoch"], _ci(e["ss"], e["ss_ci"]), f"{e['lms']:.2f}", f"{e['icat']:.2f}",
                                  f"{e['mean_gap']:+.4f}", f"{100 * e['share_adv_preferred']:.1f}%"]
                                 for e in s["epochs"]]))
                page.image(log_dir / "unlearning.png", "PCGU gap per step and selection SS per epoch")
        if stage.script == "14_compare_prompts.py":
            out = Path(stage.args["out"])
            if (out / "completions.md").is_file():
                page.add(f"### Prompt completions\n\nThe same prompts completed by each model (qualitative): "
                         f"{page.link(out / 'completions.md', 'completions.md')}.\n")


def _bbq_rows(metrics: dict) -> list[list[str]]:
    from fairforget.evals.bbq_metrics import metric_groups

    return [[name, g["n"], _ci(g["acc"], g["acc_ci"], 3), _ci(g["s_dis"], g["s_dis_ci"], 3, True),
             _ci(g["s_amb"], g["s_amb_ci"], 3, True)] for name, g in metric_groups(metrics).items()]


def _bbq(page: _Page, stages: Sequence[Stage]) -> None:
    from fairforget.evals.bbq_eval import read_items
    from fairforget.evals.bbq_metrics import compare_runs

    header = ["category", "n", "accuracy", "s_DIS", "s_AMB"]
    runs = _runs(stages, "20_evaluate_bbq.py")
    if not runs:
        page.add("### BBQ (stage 20)\n\nNot run.\n")
    for label, stage, out in runs:
        m = read_json(out / "metrics.json")
        page.add(f"### BBQ, {label} (stage 20)\n\n{m.get('definition', '')}.\n")
        page.add(_table(header, _bbq_rows(m)))
        page.image(out / "bias_scores.png", "BBQ bias scores by category")
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
        stage_runs = [name for name in ("before", "pruned", "recovered") if (out / name / "items.jsonl").is_file()]
        rows = []
        for name in stage_runs:
            g = read_json(out / name / "metrics.json")["overall"]
            rows.append([name, g["n"], _ci(g["acc"], g["acc_ci"], 3), _ci(g["s_dis"], g["s_dis_ci"], 3, True),
                         _ci(g["s_amb"], g["s_amb_ci"], 3, True)])
        page.add(_table(["model", "n", "accuracy", "s_DIS", "s_AMB"], rows))
        rows = []
        before = read_items(out / "before")
        for name in stage_runs[1:]:
            c = compare_runs(before, read_items(out / name))["overall"]
            rows.append([f"before -> {name}", _ci(c["acc_delta"], c["acc_delta_ci"], 3, True),
                         _ci(c["s_dis_delta"], c["s_dis_delta_ci"], 3, True),
                         _ci(c["s_amb_delta"], c["s_amb_delta_ci"], 3, True), _p(c["mcnemar_correct"]["p_value"]),
                         _p(c["mcnemar_biased"]["p_value"])])
        if rows:
            page.add("Paired changes on the same held-out items (95% paired cluster-bootstrap intervals over "
                     "scenarios; McNemar exact "
                     "p on correct and on biased answers):\n")
            page.add(_table(["comparison", "change in accuracy", "change in s_DIS", "change in s_AMB",
                             "p (correct)", "p (biased)"], rows))
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
        page.add(_table(["file", "sha256", "upstream"],
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
    page.add(_table(["stage", "status", "wall s", "note"], rows))
    for pipeline, heading in (("pcgu", "Pipeline 1: PCGU unlearning"), ("bbq", "Pipeline 2: BBQ and attention heads")):
        mine = [s for s in stages if s.pipeline == pipeline]
        if not mine:
            continue
        model = next((s.args["model"] for s in mine if "model" in s.args), "?")
        page.add(f"## {heading} ({model})\n")
        try:
            if pipeline == "pcgu":
                _stereoset(page, mine)
                _crows(page, mine)
                _training(page, mine)
            else:
                _bbq(page, mine)
        except (FairforgetError, KeyError, ValueError) as exc:
            page.add(f"(part of this section could not be built from the stage outputs: {exc})\n")
    _provenance(page, results, data_root)
    text = page.text()
    write_text(path, text)
    return text
