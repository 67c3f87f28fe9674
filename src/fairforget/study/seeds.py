"""Seed replicates in stage 30: a method run again with other seeds is named ``<method>:seed<N>`` beside
``<method>`` (its first seed); per method and measure, the seed mean and spread (sample standard deviation)
of the paired change against before, beside each run's own bootstrap interval."""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from fairforget.markdown import ci_text, table

SEED_MARK = ":seed"
# (key of stage 30's paired changes, value, interval, title)
MEASURES = [("ss_gender_distance", "delta", "delta_ci", "Δ gender abs(SS-50)"),
            ("winobias", "delta", "delta_ci", "Δ WinoBias pro %"),
            ("crows_gender", "delta", "delta_ci", "Δ CrowS gender"),
            ("bbq_gender", "delta", "delta_ci", "Δ BBQ gender s_AMB"),
            ("perplexity", "ppl_change_pct", "ppl_change_pct_ci", "Δ perplexity %")]


def seed_run(method: str, seed: int) -> str:
    """Stage 30's name of ``method`` run with another ``seed``."""
    return f"{method}{SEED_MARK}{seed}"


def seed_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Each method with replicates: its runs' names (the plain name first), for methods run with 2+ seeds."""
    names = list(names)
    groups = {n: [n] for n in names if SEED_MARK not in n}
    for n in names:
        if SEED_MARK in n and n.split(SEED_MARK, 1)[0] in groups:
            groups[n.split(SEED_MARK, 1)[0]].append(n)
    return {m: runs for m, runs in groups.items() if len(runs) > 1}


def seed_rows(changes: dict[str, dict], groups: dict[str, list[str]]) -> list[dict]:
    """seeds.csv: per method and measure, the number of seeds, the mean, spread, minimum and maximum of the paired
    change, and every run's change with its interval."""
    rows = []
    for method, runs in groups.items():
        for key, value, interval, _ in MEASURES:
            if key not in changes[runs[0]]:  # BBQ gender: only when stage 30 scored it
                continue
            values = [changes[r][key][value] for r in runs]
            rows.append({"method": method, "measure": key, "n_seeds": len(runs), "mean": statistics.fmean(values),
                         "sd": statistics.stdev(values), "min": min(values), "max": max(values),
                         "runs": "; ".join(ci_text(changes[r][key][value], changes[r][key][interval], 2, signed=True)
                                           for r in runs)})
    return rows


def seeds_markdown(rows: Sequence[dict]) -> str:
    """The summary.md section: mean ± spread over seeds per measure, then each run's change and interval."""
    if not rows:
        return ""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["measure"]): r for r in rows}
    shown = [m for m in MEASURES if (methods[0], m[0]) in by]
    cells = [[m, by[(m, shown[0][0])]["n_seeds"],
              *(f"{by[(m, k)]['mean']:+.2f} ± {by[(m, k)]['sd']:.2f}" for k, *_ in shown)] for m in methods]
    runs = [[m, title, by[(m, k)]["runs"]] for m in methods for k, _, _, title in shown]
    return ("\n## Seeds: mean ± spread (sample SD) of the paired change over seeds\n\n"
            + table(["method", "seeds", *(title for *_, title in shown)], cells)
            + "\nEach seed's own change with its paired 95% interval:\n\n" + table(["method", "measure", "runs"], runs))
