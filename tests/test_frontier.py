"""The frontier tables (fairforget.study.frontier), checked by hand on small fixtures."""

from __future__ import annotations

import math

import pytest

from fairforget.errors import FairforgetError
from fairforget.study.frontier import damage_distance, frontier_markdown, kept_start, setting_folders, setting_value


def _row(method: str, setting: str, ppl: float, gender: float, half: float) -> dict:
    row = {"method": method, "setting": setting, "value": setting_value(setting), "d_ppl_pct": ppl,
           "d_ppl_pct_ci_low": ppl - 1, "d_ppl_pct_ci_high": ppl + 1, "d_lms": -0.5}
    for stem in ("gender", "winobias", "crows_gender"):
        row.update({f"d_{stem}": gender, f"d_{stem}_ci_low": gender - half, f"d_{stem}_ci_high": gender + half,
                    f"mdc_{stem}": 3.0})
    return row


def test_distance_from_the_damage_curve_is_interpolated_at_equal_perplexity_cost():
    rows = [_row("damage_reference", "lambda_1", 10.0, -2.0, 4.0),
            _row("task_vector", "lambda_1", 5.0, -3.0, 1.0), _row("task_vector", "lambda_2", 20.0, -6.0, 1.0),
            _row("cda", "epochs_1", -1.0, -1.0, 1.0)]
    inside, beyond, below = damage_distance(rows, "gender")
    # the damage curve runs from its strength 0 (the before model: 0, 0, no interval) to (+10%, -2, half-width 4);
    # at +5% it is -1 with half-width 2
    assert inside["distance"] == pytest.approx(-2.0)
    assert inside["distance_ci"] == pytest.approx([-2.0 - math.hypot(1.0, 2.0), -2.0 + math.hypot(1.0, 2.0)])
    assert math.isnan(beyond["distance"]) and math.isnan(below["distance"])  # +20% and -1% are outside it
    assert damage_distance(rows[1:], "gender") == []  # no damage curve, no distance
    text = frontier_markdown(rows, {"task_vector": "lambda_1"})
    assert "| task_vector | lambda_1 * |" in text and "| task_vector | lambda_2 |" in text
    assert "| -2.00 [" in text and text.count("| n/a |") == 3  # the damage row and the two points outside


def test_setting_folders_are_ordered_by_value_and_an_empty_folder_is_refused(tmp_path):
    for name in ("lambda_1", "lambda_0.5", "lambda_10", "lambda_0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # no model config: not a setting
    assert list(setting_folders("tv", tmp_path)) == ["tv@lambda_0", "tv@lambda_0.5", "tv@lambda_1", "tv@lambda_10"]
    with pytest.raises(FairforgetError, match="holds no saved settings"):
        setting_folders("tv", tmp_path / "notes")


def test_a_method_that_kept_strength_0_of_before_is_recognised_from_its_record():
    def record(setting, model="embedded:m"):
        return {"chosen_setting": setting, "provenance": {"config": {"model": model}}}

    assert kept_start(record("lambda_0"), "embedded:m") and kept_start(record("step_0"), "embedded:m")
    assert not kept_start(record("lambda_0.5"), "embedded:m")  # a nonzero strength
    assert not kept_start(record("lambda_0", "models/planted"), "embedded:m")  # started from another model
    assert not kept_start(record(None), "embedded:m") and not kept_start({}, "embedded:m")  # no setting recorded


def test_the_header_gives_the_median_and_range_of_each_measures_detectable_change_over_settings_that_flipped_any():
    from fairforget.study.frontier import mdc_text

    rows = [_row("cda", "epochs_1", 1.0, 0.0, 1.0), _row("cda", "epochs_2", 2.0, 1.0, 1.0),
            _row("leace", "alpha_1", 1.0, 1.0, 1.0), _row("inlp", "iterations_5", 1.0, 1.0, 1.0)]
    for row, mdc in zip(rows, (0.0, 2.0, 5.0, 3.5)):  # the first flipped no decision
        row["mdc_gender"] = mdc
    assert mdc_text(rows, "gender") == "±3.50 (2.00-5.00)"
    assert mdc_text(rows[:1], "gender") == "n/a"
    assert "gender ±3.50 (2.00-5.00); winobias ±3.00 (3.00-3.00)" in frontier_markdown(rows, {})
