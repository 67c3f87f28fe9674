"""Stage 30's comparison module (fairforget.study.compare): paired changes and the summary tables."""

from __future__ import annotations

import pytest

from fairforget.errors import FairforgetError
from fairforget.evals.suite import Items, distance_change
from fairforget.study.compare import markdown, paired_rows, summary_row


def _stereoset_items(prefers_stereotype: list[bool], domain: str = "gender") -> list[dict]:
    """Three candidate items per example; the stereotype outscores the anti-stereotype where asked."""
    items = []
    for k, pro in enumerate(prefers_stereotype):
        scores = {"stereotype": -1.0 if pro else -3.0, "anti-stereotype": -2.0, "unrelated": -5.0}
        items += [{"example_id": f"e{k}", "split": "intrasentence", "bias_type": domain, "target": "t",
                   "gold_label": label, "score": score} for label, score in scores.items()]
    return items


def test_distance_change_is_the_paired_change_of_abs_ss_minus_50():
    before = _stereoset_items([True, True, True, False])  # SS 75: 25 from 50
    after = _stereoset_items([True, False, True, False])  # SS 50: 0 from 50
    change = distance_change(before + _stereoset_items([True], "race"), after + _stereoset_items([False], "race"),
                             "gender", n_boot=50, seed=0)
    assert (change["before"], change["after"], change["delta"], change["n"]) == (25.0, 0.0, -25.0, 4)
    assert change["p_value"] == 1.0  # one flipped decision
    assert change["mdc"] == pytest.approx(100 * 1.959964 * 1 ** 0.5 / 4)  # z sqrt(b + c) / n, one flip of 4
    same = distance_change(before, before, None, n_boot=50, seed=0)
    assert same["delta"] == 0 and same["delta_ci"] == [0.0, 0.0] and same["mdc"] == 0
    with pytest.raises(FairforgetError, match="different examples"):
        distance_change(before, after[:3], None, n_boot=50, seed=0)


def _levels(value: float) -> dict:
    cell = {"ss": value, "ss_ci": [value - 1, value + 1], "lms": 90.0, "lms_ci": [89.0, 91.0]}
    return {"stereoset": {"all": cell, "gender": cell},
            "crows": {g: {"metric": value, "metric_ci": [value - 2, value + 2]} for g in ("overall", "gender")},
            "winobias": {"overall": {"metric": value + 3, "metric_ci": [value + 1, value + 5]}},
            "bbq": {"overall": {"s_dis": float("nan"), "s_dis_ci": [0.0, 0.0], "s_amb": 0.1, "s_amb_ci": [0.0, 0.2],
                                "acc": 0.5, "acc_ci": [0.4, 0.6]}},
            "perplexity": {"perplexity": 20.0, "perplexity_ci": [19.0, 21.0]}}


def test_summary_rows_and_tables_show_values_with_intervals():
    row = summary_row("before", _levels(55.0), None, {"wall_seconds": 3})
    assert row["ss_gender"] == "55.00 [54.00, 56.00]" and row["crows_all"] == "55.00 [53.00, 57.00]"
    assert row["winobias"] == "58.00 [56.00, 60.00]"
    assert row["bbq_s_dis"] == "n/a" and row["bbq_s_amb"] == "0.100 [0.000, 0.200]"
    assert row["wall_seconds"] == 3 and row["peak_memory_mib"] == "n/a" and "d_ss_overall" not in row
    gender_pair = type("Pair", (), {"bias_type": "gender"})()
    bbq_items = [type("Bbq", (), {"category": c})() for c in ("Age", "Gender_identity", "Gender_identity")]
    items = Items([], set(), [gender_pair, gender_pair], {"c1"}, [1, 2, 3], bbq_items, ["text"], [], {("Age", 1)})
    text = markdown([row], items, "base", 7.0)
    assert "1 BBQ examples (answer mode, held-out scenarios; 2 Gender_identity examples for BBQ gender)" in text
    assert "BBQ gender s_AMB" not in text  # a column only where stage 30 scored BBQ gender
    assert "| before | 55.00 [54.00, 56.00] |" in text and "7 s" in text
    assert "1 CrowS-Pairs pairs (proportional sample: all) plus every gender pair (2 in all), 3 WinoBias" in text
    assert sum(line.startswith("|---|") for line in text.splitlines()) == 2  # levels, (empty) paired changes
    rows = paired_rows({"m": {"bbq": {"n": 3, "acc_delta": 0.1, "acc_delta_ci": [0.0, 0.2], "mcnemar": {}},
                              "crows_gender": None}})
    assert rows == [{"method": "m", "measure": "bbq", "n": 3, "acc_delta": 0.1, "acc_delta_ci": [0.0, 0.2]}]
