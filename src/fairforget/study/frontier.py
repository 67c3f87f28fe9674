"""Bias-capability frontiers (stage 30 ``--frontiers``): every saved setting of a method (its stage's
``--settings-dir``, one model folder per strength) scored by the held-out suite and paired against "before".

A method's frontier is its curve of paired bias change against paired perplexity change, one point per setting,
each with its 95% intervals. The damage reference (a negated task vector of neutral text: it targets nothing) is
the curve to beat: a method helps only where its curve lies below it at the same perplexity cost.
:func:`damage_distance` gives that vertical distance at each point (the damage curve interpolated linearly at
the point's perplexity change; its interval combines the two points' half-widths in quadrature, which ignores
their positive correlation through the shared items and so is conservative).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from fairforget.errors import FairforgetError
from fairforget.markdown import ci_text, table
from fairforget.methods.registry import CONFIG_FILE
from fairforget.plots import new_figure, save_figure
from fairforget.study.compare import lms_change

DAMAGE = "damage_reference"
MODEL_CONFIGS = ("config.json", "adapter_config.json", CONFIG_FILE)  # what makes a subfolder a saved setting
SEPARATOR = "@"  # stage 30's name of a setting: <method>@<folder name>, e.g. task_vector@lambda_0.5
# (key of stage 30's paired changes, file stem, axis label)
MEASURES = [("ss_gender_distance", "gender", "change in StereoSet gender |SS - 50| (points)"),
            ("winobias", "winobias", "change in WinoBias pro-stereotypical % (points, 50 ideal)"),
            ("crows_gender", "crows_gender", "change in CrowS-Pairs gender % (points, 50 ideal)"),
            ("bbq_gender", "bbq_gender", "change in BBQ Gender_identity s_AMB (-1..1, 0 ideal)")]

TITLES = {"gender": "Δ gender abs(SS-50)", "winobias": "Δ WinoBias pro %", "crows_gender": "Δ CrowS gender",
          "bbq_gender": "Δ BBQ gender s_AMB"}


def measured(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """The measures of ``MEASURES`` that ``rows`` hold (BBQ gender only when stage 30 scored it)."""
    return [m for m in MEASURES if rows and f"d_{m[1]}" in rows[0]]


def setting_folders(name: str, folder: Path | str) -> dict[str, Path]:
    """``<name>@<sub>`` for every saved setting (a subfolder holding a model or adapter config) of ``folder``, in
    the order of the settings' values (``<knob>_<value>``)."""
    folder = Path(folder)
    subs = [p for p in folder.iterdir()
            if p.is_dir() and any((p / n).is_file() for n in MODEL_CONFIGS)] if folder.is_dir() else []
    if not subs:
        raise FairforgetError(f"--frontiers {name}: {folder} holds no saved settings (run the method's stage with "
                              f"--settings-dir {folder})")
    return {f"{name}{SEPARATOR}{p.name}": p for p in sorted(subs, key=lambda p: (setting_value(p.name), p.name))}


def setting_value(setting: str) -> float:
    """The strength a setting folder name ends with (``lambda_0.5`` -> 0.5; NaN when it has none)."""
    try:
        return float(setting.rsplit("_", 1)[-1])
    except ValueError:
        return math.nan


def kept_start(record: dict, before: str) -> bool:
    """Whether a method's record says it kept strength 0 (its chosen setting's value is 0) of ``before``: by the
    method contract that output is the start model exactly, so stage 30 pairs it with before's own scores."""
    started_from = record.get("provenance", {}).get("config", {}).get("model")
    return started_from == before and setting_value(str(record.get("chosen_setting"))) == 0


def frontier_rows(changes: dict[str, dict], results: dict[str, dict]) -> list[dict]:
    """frontier.csv: one row per saved setting, its paired perplexity and LMS change and each bias measure's
    paired change against before, with intervals."""
    rows = []
    for name, change in changes.items():
        if SEPARATOR not in name:
            continue
        method, setting = name.split(SEPARATOR, 1)
        p = change["perplexity"]
        row = {"method": method, "setting": setting, "value": setting_value(setting),
               "d_ppl_pct": p["ppl_change_pct"], "d_ppl_pct_ci_low": p["ppl_change_pct_ci"][0],
               "d_ppl_pct_ci_high": p["ppl_change_pct_ci"][1],
               "d_lms": lms_change(name, results)}
        for key, stem, _ in MEASURES:
            if key not in change:
                continue
            c = change[key]
            row.update({f"d_{stem}": c["delta"], f"d_{stem}_ci_low": c["delta_ci"][0],
                        f"d_{stem}_ci_high": c["delta_ci"][1], f"mdc_{stem}": c["mdc"]})
        rows.append(row)
    return rows


def damage_distance(rows: Sequence[dict], stem: str) -> list[dict]:
    """For each non-damage point: its bias change minus the damage curve's at the same perplexity change
    (negative: more bias removed than damage alone buys), with a conservative interval; NaN outside the damage
    curve's perplexity range (from 0, its strength 0, to its largest setting's)."""
    damage = sorted((r for r in rows if r["method"] == DAMAGE), key=lambda r: r["d_ppl_pct"])
    if not damage:
        return []
    # the curve starts at its strength 0, the before model itself: no change on either axis, no interval
    xs = np.array([0.0, *(r["d_ppl_pct"] for r in damage)])
    ys = np.array([0.0, *(r[f"d_{stem}"] for r in damage)])
    half = np.array([0.0, *((r[f"d_{stem}_ci_high"] - r[f"d_{stem}_ci_low"]) / 2 for r in damage)])
    out = []
    for r in rows:
        if r["method"] == DAMAGE:
            continue
        x = r["d_ppl_pct"]
        inside = xs[0] <= x <= xs[-1]
        y_damage = float(np.interp(x, xs, ys)) if inside else math.nan
        width = math.hypot((r[f"d_{stem}_ci_high"] - r[f"d_{stem}_ci_low"]) / 2, float(np.interp(x, xs, half)))
        distance = r[f"d_{stem}"] - y_damage
        out.append({"method": r["method"], "setting": r["setting"], "d_ppl_pct": x, "distance": distance,
                    "distance_ci": [distance - width, distance + width]})
    return out


def plot_frontiers(rows: Sequence[dict], folder: Path, budget_pct: float = 5.0) -> list[Path]:
    """``frontier_<measure>.png``: per measure, one line per method through its settings (x: perplexity change
    %, y: the bias change, 95% interval bars), the damage reference dashed; the +``budget_pct``% budget marked."""
    paths = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for _, stem, label in measured(rows):
        fig, ax = new_figure(figsize=(7, 4.8))
        for method in methods:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["value"])
            x = np.array([r["d_ppl_pct"] for r in mine])
            y = np.array([r[f"d_{stem}"] for r in mine])
            yerr = [y - [r[f"d_{stem}_ci_low"] for r in mine], [r[f"d_{stem}_ci_high"] for r in mine] - y]
            xerr = [x - [r["d_ppl_pct_ci_low"] for r in mine], [r["d_ppl_pct_ci_high"] for r in mine] - x]
            style = {"color": "black", "ls": "--"} if method == DAMAGE else {}
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, lw=1, label=method, **style)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(budget_pct, color="red", lw=0.7, ls=":", label=f"perplexity +{budget_pct:g}% budget")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("perplexity change on neutral held-out text (%, 95% CI; symlog)")
        ax.set_ylabel(label)
        ax.set_title("Frontier: paired change against before, held-out items, one point per setting")
        ax.legend(fontsize=7, loc="best")
        path = folder / f"frontier_{stem}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def mdc_text(rows: Sequence[dict], stem: str) -> str:
    """``±2.84 (2.10-3.42)``: the median and range of a measure's minimum detectable change over the settings
    that flipped any of its decisions (a setting that flipped none has a detectable change of 0, which says
    nothing of the items' power); ``n/a`` when none did."""
    values = [r[f"mdc_{stem}"] for r in rows if r[f"mdc_{stem}"] > 0]
    if not values:
        return "n/a"
    return f"±{float(np.median(values)):.2f} ({min(values):.2f}-{max(values):.2f})"


def frontier_markdown(rows: Sequence[dict], chosen: dict[str, str]) -> str:
    """The summary.md section: every setting's point (``*``: the setting its stage chose on the selection half,
    ``chosen``: method -> setting folder name) and its distance from the damage curve on gender |SS - 50|."""
    if not rows:
        return ""
    distance = {(d["method"], d["setting"]): d for d in damage_distance(rows, "gender")}
    lines = []
    for r in rows:
        d = distance.get((r["method"], r["setting"]))
        lines.append([r["method"], r["setting"] + (" *" if chosen.get(r["method"]) == r["setting"] else ""),
                      ci_text(r["d_ppl_pct"], [r["d_ppl_pct_ci_low"], r["d_ppl_pct_ci_high"]], 1, signed=True),
                      f"{r['d_lms']:+.2f}",
                      *(ci_text(r[f"d_{stem}"], [r[f"d_{stem}_ci_low"], r[f"d_{stem}_ci_high"]], 2, signed=True)
                        for _, stem, _ in measured(rows)),
                      "n/a" if d is None or math.isnan(d["distance"]) else ci_text(d["distance"], d["distance_ci"], 2,
                                                                                   signed=True)])
    mdc = "; ".join(f"{stem} {mdc_text(rows, stem)}" for _, stem, _ in measured(rows))
    return ("\n## Frontiers: every saved setting, paired against before (held-out items)\n\n"
            "One row per setting (`*`: the one its stage chose on the selection half). Gender vs damage: the change "
            "in gender |SS - 50| minus the damage reference's at the same perplexity change (interpolated; negative: "
            "more removed than damage alone; interval from the two half-widths in quadrature, conservative; n/a "
            f"outside the damage curve's range). Minimum detectable change at this size (median over the settings that flipped "
            f"a decision, and its range): {mdc} points. Figures: "
            + ", ".join(f"`frontier_{stem}.png`" for _, stem, _ in measured(rows)) + ".\n\n"
            + table(["method", "setting", "Δ perplexity %", "Δ LMS",
                     *(TITLES[stem] for _, stem, _ in measured(rows)), "gender vs damage"], lines))
