"""The minimum detectable change of a paired share against hand computation and a paired bootstrap."""

import numpy as np
import pytest

from fairforget.stats import interval_half_width, minimum_detectable_change

Z = 1.959964  # the 97.5% normal quantile


def test_flips_formula_by_hand():
    before = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    after = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)  # b = 2 flipped off, c = 1 flipped on, n = 10
    assert minimum_detectable_change(before, after) == pytest.approx(Z * np.sqrt(3) / 10, rel=1e-6)
    assert minimum_detectable_change(before, before) == 0.0
    assert minimum_detectable_change(before, after, level=0.90) == pytest.approx(1.644854 * np.sqrt(3) / 10, rel=1e-6)
    assert np.isnan(minimum_detectable_change(np.array([], bool), np.array([], bool)))


def test_clusters_sum_their_changes_before_squaring():
    before = np.array([1, 1, 0, 0], bool)
    after = np.array([0, 0, 0, 1], bool)  # changes -1, -1, 0, +1
    # clusters A = {0, 1}: -2, B = {2, 3}: +1 -> sqrt(4 + 1) / 4
    assert minimum_detectable_change(before, after, np.array(["A", "A", "B", "B"])) == \
        pytest.approx(Z * np.sqrt(5) / 4, rel=1e-6)
    singletons = np.arange(4)
    assert minimum_detectable_change(before, after, singletons) == pytest.approx(minimum_detectable_change(before, after))


def test_matches_the_paired_bootstrap_under_no_change():
    n, flips = 400, 30  # 30 items flip each way: no change in the share
    before = np.zeros(n, bool)
    after = np.zeros(n, bool)
    before[:flips], after[flips:2 * flips] = True, True
    rng = np.random.default_rng(0)
    draws = rng.integers(0, n, (4000, n))
    changes = after[draws].mean(axis=1) - before[draws].mean(axis=1)
    low, high = np.percentile(changes, [2.5, 97.5])
    assert minimum_detectable_change(before, after) == pytest.approx((high - low) / 2, rel=0.1)
    assert minimum_detectable_change(before, after) == pytest.approx(Z * np.sqrt(60) / 400, rel=1e-6)


def test_interval_half_width():
    assert interval_half_width([-2.0, 4.0]) == 3.0
