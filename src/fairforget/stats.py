"""Confidence intervals, paired tests and seeded stratified sampling shared by every evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

from fairforget.errors import FairforgetError

DEFAULT_BOOTSTRAP = 1000
T = TypeVar("T")


def _resampling_units(n_items: int, strata: np.ndarray | None,
                      clusters: np.ndarray | None) -> list[list[np.ndarray]]:
    """Per stratum, the units drawn with replacement: single items, or the items of one cluster each
    (a cluster's stratum is that of its first item)."""
    strata = np.zeros(n_items, dtype=int) if strata is None else np.asarray(strata)
    if clusters is None:
        return [[np.flatnonzero(strata == s)] for s in np.unique(strata)]
    labels, first, inverse = np.unique(np.asarray(clusters), return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(labels)))[:-1])
    by_stratum: dict = {}
    for k, member in enumerate(members):
        by_stratum.setdefault(strata[first[k]], []).append(member)
    return [by_stratum[s] for s in sorted(by_stratum, key=str)]


def bootstrap_intervals(statistic: Callable[[np.ndarray], Sequence[float]], n_items: int,
                        n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95,
                        strata: np.ndarray | None = None, clusters: np.ndarray | None = None) -> np.ndarray:
    """Percentile bootstrap intervals ``[k, 2]`` of a statistic returning ``k`` values from an index array.

    Items are resampled with replacement, within each stratum when ``strata`` gives one label per item
    (keeping the strata sizes). With ``clusters`` (one label per item) whole clusters are resampled instead,
    the cluster bootstrap for items that share a template. NaN replicates are ignored per value; a value
    with none left gets (nan, nan).
    """
    rng = np.random.default_rng(seed)
    units = _resampling_units(n_items, strata, clusters) if n_items else []
    replicates = []
    for _ in range(n_boot if n_items else 0):
        if clusters is None:
            idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for (g,) in units])
        else:
            idx = np.concatenate([group[k] for group in units for k in rng.integers(0, len(group), len(group))])
        replicates.append(np.atleast_1d(np.asarray(statistic(idx), dtype=float)))
    if not replicates:
        width = np.atleast_1d(np.asarray(statistic(np.arange(0)), dtype=float)).size if n_items else 1
        return np.full((width, 2), np.nan)
    table = np.stack(replicates)
    tail = (1 - level) / 2 * 100
    intervals = np.full((table.shape[1], 2), np.nan)
    for k in range(table.shape[1]):
        column = table[:, k][np.isfinite(table[:, k])]
        if column.size:
            intervals[k] = np.percentile(column, [tail, 100 - tail])
    return intervals


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n_items: int, n_boot: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0, level: float = 0.95, strata: np.ndarray | None = None,
                 clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of one scalar ``statistic(indices)`` (see :func:`bootstrap_intervals`)."""
    if n_items == 0:
        return (float("nan"), float("nan"))
    low, high = bootstrap_intervals(statistic, n_items, n_boot, seed, level, strata, clusters)[0]
    return (float(low), float(high))


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (in 0..1)."""
    from scipy.stats import norm

    if n == 0:
        return (float("nan"), float("nan"))
    z = norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test on paired binary decisions (before vs after on the same items)."""

    n: int
    only_before: int
    only_after: int
    p_value: float

    def as_dict(self) -> dict:
        return {"test": "mcnemar_exact", "n": self.n, "true_before_only": self.only_before,
                "true_after_only": self.only_after, "p_value": self.p_value}


def mcnemar(before: np.ndarray, after: np.ndarray) -> PairedTest:
    """Exact McNemar test of whether the rate of True differs between two paired boolean arrays."""
    from scipy.stats import binomtest

    change = _paired_change(before, after)
    b, c = int(np.sum(change < 0)), int(np.sum(change > 0))
    p_value = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return PairedTest(int(change.size), b, c, p_value)


def _paired_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per item, after - before of two paired boolean arrays: -1, 0 or +1."""
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError(f"paired arrays differ in shape: {before.shape} vs {after.shape}")
    return after.astype(int) - before.astype(int)


def minimum_detectable_change(before: np.ndarray, after: np.ndarray, clusters: np.ndarray | None = None,
                              level: float = 0.95) -> float:
    """Half-width of the paired interval of a change in a share (0..1) under no change: z * sqrt(b + c) / n,
    with b and c the items whose decision flipped each way (GUIDE section 9). A paired change smaller than
    this could not have been told from zero at these items' flips.

    The variance is the no-change one, sum over items of (after - before)^2 / n^2, not centred on the observed
    change. With ``clusters`` (one label per item, as for :func:`bootstrap_ci`) it sums the squared change of
    each cluster instead, the cluster-robust form that reduces to the flips formula for singleton clusters.
    """
    from scipy.stats import norm

    change = _paired_change(before, after)
    n = change.size
    if n == 0:
        return float("nan")
    if clusters is not None:
        change = np.bincount(np.unique(np.asarray(clusters), return_inverse=True)[1].ravel(), weights=change)
    return float(norm.ppf(0.5 + level / 2) * np.sqrt(np.sum(change ** 2)) / n)


def interval_half_width(interval: Sequence[float]) -> float:
    """The minimum detectable change from a paired-bootstrap interval of a change that is not a share of
    decisions (e.g. a BBQ bias score): its half-width, the interval recentred on no change."""
    low, high = interval
    return float((high - low) / 2)


def proportional_sample(groups: Sequence[Sequence[T]], limit: int | None, seed: int = 0) -> list[T]:
    """About ``limit`` items drawn with a seed from ``groups`` (strata, in a fixed order), each stratum
    contributing in proportion to its size and at least one item; every item when ``limit`` is None or
    covers them all. Within a stratum the chosen items keep their order."""
    total = sum(len(g) for g in groups)
    if limit is None or limit >= total:
        return [item for group in groups for item in group]
    if limit < 1:
        raise FairforgetError(f"--limit must be at least 1, got {limit}")
    rng = np.random.default_rng(seed)
    chosen: list[T] = []
    for group in groups:
        take = min(len(group), max(1, round(limit * len(group) / total)))
        chosen.extend(group[i] for i in sorted(rng.choice(len(group), size=take, replace=False)))
    return chosen
