""""What this run found": per bias measure, the largest paired change a model of the run made, with its 95%
interval, McNemar p and the decisions it flipped, beside that model's capability cost (LMS, perplexity).

Everything is read from the files the stages wrote: the pipeline-1 evaluation run folders (paired here from
their ``items.jsonl`` by each evaluation's ``compare``, as the report's tables are), stage 22's
``metrics.json`` (its paired ``changes`` and ``rows``) and stage 30's ``metrics.json`` (``changes``,
``levels``, and for a positive control ``shares``: the share of the planted shift each method removed). :func:`findings_block` is the top of ``outputs/report.md``; ``run_pipeline.py --findings-only``
prints it for the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fairforget.artifacts import read_json
from fairforget.errors import FairforgetError
from fairforget.evals.interface import Evaluation, Run
from fairforget.evals.registry import EVALUATIONS
from fairforget.markdown import ci_text, p_text, pairs, table

# a change is "cheap" within the README's capability bar: LMS at most 2 points lower, perplexity at most +5%
MAX_LMS_DROP, MAX_PPL_PCT = 2.0, 5.0
SIGNIFICANT = 0.05
MEASURES = {  # name -> (the value an unbiased model has, digits shown)
    "StereoSet SS, held-out (micro)": (50.0, 2), "StereoSet gender SS (micro)": (50.0, 2),
    "StereoSet gender |SS - 50|": (0.0, 2), "CrowS-Pairs (% stereotyping preferred)": (50.0, 2),
    "CrowS-Pairs gender (% stereotyping preferred)": (50.0, 2), "WinoBias (% pro-stereotypical preferred)": (50.0, 2),
    "BBQ s_AMB": (0.0, 3), "BBQ gender s_AMB": (0.0, 3)}


@dataclass(frozen=True)
class Change:
    """One paired change of one bias measure: after - before on the same held-out items."""

    measure: str
    model: str  # the changed model and what it is compared with
    delta: float
    ci: Sequence[float]
    p: float | None
    n: int | None = None
    flips: int | None = None  # decisions that changed, either way (None: not recorded)
    before: float | None = None
    after: float | None = None
    lms: tuple[float, Sequence[float], float] | None = None  # (after, its interval, before)
    ppl_pct: tuple[float, Sequence[float]] | None = None  # perplexity change % and its interval

    @property
    def distance_change(self) -> float | None:
        """How much closer to the unbiased value (negative) or farther (positive) the after model is."""
        if self.before is None or self.after is None:
            return None
        ideal = MEASURES[self.measure][0]
        return abs(self.after - ideal) - abs(self.before - ideal)

    @property
    def towards_ideal(self) -> bool:
        return self.distance_change is not None and self.distance_change < 0

    def text(self) -> str:
        """The change with its interval and the direction it moved the measure."""
        return ci_text(self.delta, self.ci, MEASURES[self.measure][1], signed=True) + _direction(self)

    @property
    def significant(self) -> bool:
        low, high = self.ci
        return self.p is not None and self.p < SIGNIFICANT and (low > 0 or high < 0)

    @property
    def cheap(self) -> bool:
        """Within the capability bar on every capability figure that was measured (and at least one was)."""
        if self.lms is None and self.ppl_pct is None:
            return False
        return ((self.lms is None or self.lms[2] - self.lms[0] <= MAX_LMS_DROP)
                and (self.ppl_pct is None or self.ppl_pct[0] <= MAX_PPL_PCT))


def stage_runs(evaluation: Evaluation, stages: Sequence) -> tuple[list[Run], list[str]]:
    """The complete run folders of the stages that write ``evaluation`` (labelled by the stage name's last
    word), and why any other folder of theirs was not read."""
    found, problems = [], []
    for stage in stages:
        out = Path(stage.args.get("out") or stage.outputs[0])
        if stage.script != evaluation.script or not out.is_dir():
            continue
        try:
            found.append(evaluation.read_run(out, stage.name.split()[-1], stage.name))
        except FairforgetError as exc:
            problems.append(f"{exc}; not read.")
    return found, problems


def _pipeline_changes(stages: Sequence) -> list[Change]:
    """StereoSet and CrowS-Pairs runs of pipeline 1, each paired with the one before it (and the last with the
    first), from their items; LMS from the StereoSet run of the same model."""
    stereo, _ = stage_runs(EVALUATIONS["stereoset"], stages)
    lms = {run.label: run.metrics["overall"]["all"] for run in stereo}
    changes = []
    for name, measure, keys in (("stereoset", "StereoSet SS, held-out (micro)", ("delta_ss_micro", "ss_micro")),
                                ("crows", "CrowS-Pairs (% stereotyping preferred)", ("delta", "metric"))):
        evaluation = EVALUATIONS[name]
        runs = {run.label: run for run in (stereo if name == "stereoset" else stage_runs(evaluation, stages)[0])}
        items = {label: evaluation.read_items(run.folder) for label, run in runs.items()}
        for before, after in pairs(list(runs)):
            c = evaluation.compare(items[before], items[after])["overall"]
            cost = ((lms[after]["lms"], lms[after]["lms_ci"], lms[before]["lms"])
                    if before in lms and after in lms else None)
            changes.append(Change(measure, f"{after} (vs {before})", c[keys[0]], c[f"{keys[0]}_ci"], c["p_value"],
                                  c["n"], c["true_before_only"] + c["true_after_only"], c[f"{keys[1]}_before"],
                                  c[f"{keys[1]}_after"], cost))
    return changes


def _mitigation_changes(folder: Path) -> list[Change]:
    """Stage 22's pruned and recovered models against before (its ``metrics.json``; the controls are its own
    section)."""
    summary = read_json(folder / "metrics.json", "stage 22 metrics")
    rows, changes = summary.get("rows", {}), summary.get("changes", {})
    found = []
    for label in ("pruned", "recovered"):
        if label not in changes:
            continue
        c, before, after = changes[label], rows.get("before", {}), rows.get(label, {})
        cost = ((after["lms_overall"], after["lms_overall_ci"], before["lms_overall"])
                if "lms_overall" in after and "lms_overall" in before else None)
        ppl = (c["d_ppl_pct"], c["d_ppl_pct_ci"]) if "d_ppl_pct" in c else None
        for measure, key, p, level in (("StereoSet SS, held-out (micro)", "d_ss_overall", "p_ss_overall", None),
                                       ("StereoSet gender SS (micro)", "d_ss_gender", "p_ss_gender", None),
                                       ("CrowS-Pairs (% stereotyping preferred)", "d_crows", "p_crows", "crows"),
                                       ("BBQ s_AMB", "d_s_amb", "p_biased", "s_amb")):
            if key in c:
                found.append(Change(measure, f"head pruning: {label} (vs before, stage 22)", c[key], c[f"{key}_ci"],
                                    c.get(p), before=before.get(level), after=after.get(level), lms=cost,
                                    ppl_pct=ppl))
    return found


def _methods_changes(folder: Path) -> list[Change]:
    """Stage 30: every method against the same before model (its ``metrics.json``)."""
    summary = read_json(folder / "metrics.json", "stage 30 metrics")
    levels, found = summary["levels"], []
    before = levels["before"]["stereoset"]["all"]
    for method, c in summary["changes"].items():
        mine = levels[method]["stereoset"]["all"]
        cost = (mine["lms"], mine["lms_ci"], before["lms"])
        ppl = (c["perplexity"]["ppl_change_pct"], c["perplexity"]["ppl_change_pct_ci"])
        label = f"{method} (vs before, stage 30)"
        s, d, q = c["ss_overall"], c["ss_gender_distance"], c["crows_all"]
        found += [Change("StereoSet SS, held-out (micro)", label, s["delta_ss_micro"], s["delta_ss_micro_ci"],
                         s["p_value"], s["n"], s["true_before_only"] + s["true_after_only"], s["ss_micro_before"],
                         s["ss_micro_after"], cost, ppl),
                  Change("StereoSet gender |SS - 50|", label, d["delta"], d["delta_ci"], d["p_value"], d["n"],
                         before=d["before"], after=d["after"], lms=cost, ppl_pct=ppl),
                  Change("CrowS-Pairs (% stereotyping preferred)", label, q["delta"], q["delta_ci"], q["p_value"],
                         q["n"], q["true_before_only"] + q["true_after_only"], q["metric_before"], q["metric_after"],
                         cost, ppl)]
        for measure, key in (("CrowS-Pairs gender (% stereotyping preferred)", "crows_gender"),
                             ("WinoBias (% pro-stereotypical preferred)", "winobias")):
            if key in c:  # stage 30 runs before these measures were added have neither
                w = c[key]
                found.append(Change(measure, label, w["delta"], w["delta_ci"], w["p_value"], w["n"],
                                    w["true_before_only"] + w["true_after_only"], w["metric_before"],
                                    w["metric_after"], cost, ppl))
        for measure, key in (("BBQ s_AMB", "bbq"), ("BBQ gender s_AMB", "bbq_gender")):
            if key in c:  # BBQ gender: only when stage 30 scored it
                b = c[key]
                found.append(Change(measure, label, b["s_amb_delta"], b["s_amb_delta_ci"],
                                    b["mcnemar_biased"]["p_value"], b["n"], before=b.get("s_amb_before"),
                                    after=b.get("s_amb_after"), lms=cost, ppl_pct=ppl))
    return found


def collect_changes(stages: Sequence) -> list[Change]:
    """Every paired change of a bias measure that this plan's finished stages recorded."""
    changes: list[Change] = []
    if any(s.pipeline == "pcgu" for s in stages):
        changes += _pipeline_changes([s for s in stages if s.pipeline == "pcgu"])
    for stage in stages:
        out = Path(stage.args.get("out") or stage.outputs[0])
        if stage.script == "22_mitigate_heads.py" and (out / "metrics.json").is_file():
            changes += _mitigation_changes(out)
        if stage.script == "30_compare_methods.py" and (out / "metrics.json").is_file():
            changes += _methods_changes(out)
    return changes


@dataclass(frozen=True)
class Share:
    """A positive control: the share of a planted shift one method removed (stage 30 with --start)."""

    model: str
    share: float | None  # percent; None where JSON kept an undefined share (no planted shift) as null
    ci: Sequence[float | None]
    planted_shift: float
    shift_ci: Sequence[float | None]
    n: int

    @property
    def removes(self) -> bool:
        """The interval excludes 0: the method removed part of the planted shift."""
        return self.ci[0] is not None and self.ci[0] > 0


SHARE_MEASURE = "stereoset_gender"  # the control the findings name (the planted gender bias is StereoSet's)


def collect_shares(stages: Sequence) -> list[Share]:
    """Every method's share of the planted StereoSet gender shift removed, from the stage-30 runs of this plan
    that scored a start model (``shares`` in their ``metrics.json``)."""
    found = []
    for stage in stages:
        out = Path(stage.args.get("out") or stage.outputs[0])
        if stage.script != "30_compare_methods.py" or not (out / "metrics.json").is_file():
            continue
        for method, by in (read_json(out / "metrics.json", "stage 30 metrics").get("shares") or {}).items():
            s = by[SHARE_MEASURE]
            found.append(Share(f"{method} (stage 30)", s["share_removed_pct"], s["share_removed_pct_ci"],
                               s["planted_shift"], s["planted_shift_ci"], s["n"]))
    return found


def shares_line(shares: Sequence[Share]) -> str:
    """One findings line: the planted StereoSet gender shift and the share of it each method removed."""
    first = shares[0]
    removing = [s.model for s in shares if s.removes]
    shift = ci_text(first.planted_shift, first.shift_ci, signed=True)
    return (f"Positive control: of the planted StereoSet gender shift ({shift} micro SS points on {first.n} "
            f"held-out examples), the share each method removed (0%: nothing, 100%: back "
            "to the start model): " + "; ".join(f"{s.model} {ci_text(s.share, s.ci, 1)}%" for s in shares)
            + ". Interval above 0: " + (", ".join(removing) if removing else "none") + ".")


def _direction(change: Change) -> str:
    moved, ideal = change.distance_change, MEASURES[change.measure][0]
    if moved is None:
        return ""
    return f" ({'towards' if moved < 0 else 'away from' if moved > 0 else 'no closer to'} {ideal:g})"


def _cost(change: Change) -> tuple[str, str]:
    lms = "not measured" if change.lms is None else \
        f"{change.lms[2]:.2f} -> {ci_text(change.lms[0], change.lms[1])}"
    ppl = "not measured" if change.ppl_pct is None else f"{ci_text(*change.ppl_pct, digits=1, signed=True)}%"
    return lms, ppl


def largest(changes: Sequence[Change]) -> list[Change]:
    """Per measure (in :data:`MEASURES` order), the change of largest magnitude."""
    best = {}
    for change in changes:
        if math.isfinite(change.delta) and (change.measure not in best
                                            or abs(change.delta) > abs(best[change.measure].delta)):
            best[change.measure] = change
    return [best[m] for m in MEASURES if m in best]


def unchanged(changes: Sequence[Change]) -> list[str]:
    """A plain sentence for every model that flipped no held-out decision on any measure it was paired on."""
    by_model: dict[str, list[Change]] = {}
    for change in changes:
        if change.flips is not None:
            by_model.setdefault(change.model, []).append(change)
    return [f"**{model} changed no held-out decision**: " + " and ".join(
        f"0 of {c.n} {c.measure.split(' ')[0]} decisions flipped" for c in found)
            + ", so its scores there equal those of the model it is compared with."
            for model, found in by_model.items() if all(c.flips == 0 for c in found)]


def findings_block(changes: Sequence[Change], shares: Sequence[Share] = ()) -> str:
    """The "What this run found" markdown of :func:`collect_changes`: the largest change per measure, then the
    conclusions generated from all of them (and, for a positive control, :func:`shares_line`)."""
    head = "## What this run found\n\n"
    if not changes:
        return head + "No paired comparison has been written yet: no bias change to report.\n"
    rows = []
    for c in largest(changes):
        lms, ppl = _cost(c)
        rows.append([c.measure, c.model, c.text(),
                     "n/a" if c.p is None else p_text(c.p), "n/a" if c.flips is None else f"{c.flips} of {c.n}",
                     lms, ppl])
    text = (head + "Generated from this run's results. For each bias measure, the largest paired change "
            "(after - before on the same held-out items; 95% paired bootstrap interval; McNemar exact p) that a "
            f"model of this run made, out of {len(changes)} paired changes, and that model's capability cost.\n\n"
            + table(["measure", "model", "change [95% CI]", "p", "decisions flipped", "LMS before -> after",
                     "perplexity change"], rows))
    significant = [c for c in changes if c.significant]
    lines = []
    if significant:
        lines.append(f"Significant (p < {SIGNIFICANT:g}, interval excluding 0): " + "; ".join(
            f"{c.model} on {c.measure}, {c.text()}, p = {p_text(c.p)}, "
            f"LMS {_cost(c)[0]}, perplexity {_cost(c)[1]}" for c in significant) + ".")
    else:
        lines.append(f"No paired change on any bias measure is significant (p < {SIGNIFICANT:g} with the interval "
                     f"excluding 0).")
    good = [c for c in significant if c.towards_ideal and c.cheap]
    lines.append("Significant changes towards the unbiased value within the capability bar (LMS at most "
                 f"{MAX_LMS_DROP:g} points lower, perplexity at most +{MAX_PPL_PCT:g}%): "
                 + ("; ".join(f"{c.model} on {c.measure}" for c in good) if good else "none") + ".")
    lines += unchanged(changes)
    if shares:
        lines.append(shares_line(shares))
    return text + "\n" + "\n".join(f"- {line}" for line in lines) + "\n"
