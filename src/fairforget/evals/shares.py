"""Share-of-pairs metrics (CrowS-Pairs, WinoBias): 100 x the share of pairs whose stereotyping sentence is
preferred, with its bootstrap interval, and the paired change between two runs on the same pairs (paired
bootstrap interval, McNemar exact test, minimum detectable change). ``clusters`` (one label per pair) makes
every interval a cluster bootstrap, for pairs that share a template."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from fairforget.markdown import ci_text, p_text
from fairforget.stats import bootstrap_ci, mcnemar, minimum_detectable_change


def share(flags: np.ndarray, n_boot: int, seed: int, clusters: np.ndarray | None = None) -> dict[str, Any]:
    """``{"n", "metric", "metric_ci"}`` of one group's boolean decisions, the metric in percent."""
    interval = bootstrap_ci(lambda idx: 100.0 * flags[idx].mean(), len(flags), n_boot=n_boot, seed=seed,
                            clusters=clusters)
    return {"n": int(len(flags)), "metric": 100.0 * float(flags.mean()), "metric_ci": list(interval)}


def paired_share_change(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int,
                        clusters: np.ndarray | None = None) -> dict[str, Any]:
    """Before, after, change (points) with its paired-bootstrap interval, McNemar on the flipped decisions, and
    ``mdc``: the half-width of the paired interval under no change (points), what these pairs could detect."""
    interval = bootstrap_ci(lambda idx: 100.0 * (after[idx].mean() - before[idx].mean()), len(before),
                            n_boot=n_boot, seed=seed, clusters=clusters)
    return {"metric_before": 100.0 * before.mean(), "metric_after": 100.0 * after.mean(),
            "delta": 100.0 * (after.mean() - before.mean()), "delta_ci": list(interval),
            **mcnemar(before, after).as_dict(), "mdc": 100.0 * minimum_detectable_change(before, after, clusters)}


def comparison_rows(groups: Iterable[tuple[str, dict]], preferred: str) -> tuple[list[str], list[list]]:
    """(header, rows) of a paired share comparison, one row per (group name, ``paired_share_change`` result);
    ``preferred`` names the sentence counted (e.g. "stereo-preferred")."""
    header = ["group", "n", "before", "after", "change [95% CI]", "MDC", f"{preferred} only before", "only after",
              "McNemar p"]
    rows = [[name, c["n"], f"{c['metric_before']:.2f}", f"{c['metric_after']:.2f}",
             ci_text(c["delta"], c["delta_ci"], signed=True), f"±{c['mdc']:.2f}", c["true_before_only"],
             c["true_after_only"], p_text(c["p_value"])] for name, c in groups]
    return header, rows
