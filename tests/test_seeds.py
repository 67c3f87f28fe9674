"""Seed replicates in stage 30 (fairforget.study.seeds), checked by hand."""

from __future__ import annotations

import statistics

import pytest

from fairforget.study.seeds import MEASURES, seed_groups, seed_rows, seed_run, seeds_markdown


def _change(gender: float, bbq_gender: bool = False) -> dict:
    entry = {"delta": gender, "delta_ci": [gender - 2, gender + 2]}
    return {"ss_gender_distance": entry, "winobias": entry, "crows_gender": entry,
            **({"bbq_gender": {"delta": gender / 10, "delta_ci": [gender / 10 - 0.2, gender / 10 + 0.2]}}
               if bbq_gender else {}),
            "perplexity": {"ppl_change_pct": 2 * gender, "ppl_change_pct_ci": [2 * gender - 1, 2 * gender + 1]}}


def test_seed_mean_and_spread_by_hand():
    changes = {"cda": _change(-1.0), seed_run("cda", 1): _change(-3.0), seed_run("cda", 2): _change(-2.0),
               "leace": _change(0.5), seed_run("ghost", 1): _change(9.0)}
    groups = seed_groups(changes)
    assert groups == {"cda": ["cda", "cda:seed1", "cda:seed2"]}  # one-run methods and orphans have no group
    rows = {r["measure"]: r for r in seed_rows(changes, groups)}
    assert set(rows) == {key for key, *_ in MEASURES} - {"bbq_gender"}  # BBQ gender: only where stage 30 scored it
    gender = rows["ss_gender_distance"]
    assert gender["n_seeds"] == 3 and gender["mean"] == pytest.approx(-2.0)
    assert gender["sd"] == pytest.approx(statistics.stdev([-1.0, -3.0, -2.0])) == pytest.approx(1.0)
    assert (gender["min"], gender["max"]) == (-3.0, -1.0) and gender["runs"].startswith("-1.00 [-3.00, +1.00]; ")
    assert rows["perplexity"]["mean"] == pytest.approx(-4.0) and rows["perplexity"]["sd"] == pytest.approx(2.0)
    text = seeds_markdown(seed_rows(changes, groups))
    assert "| cda | 3 | -2.00 ± 1.00 |" in text and seeds_markdown([]) == "" and "BBQ gender" not in text
    scored = {name: _change(c["ss_gender_distance"]["delta"], bbq_gender=True) for name, c in changes.items()}
    bbq = {r["measure"]: r for r in seed_rows(scored, groups)}["bbq_gender"]
    assert bbq["mean"] == pytest.approx(-0.2) and bbq["sd"] == pytest.approx(0.1)
    assert "| cda | 3 | -2.00 ± 1.00 | -2.00 ± 1.00 | -2.00 ± 1.00 | -0.20 ± 0.10 | -4.00 ± 2.00 |" in seeds_markdown(
        seed_rows(scored, groups))


def test_pair_source_runs_sit_beside_their_default_pairs_run():
    from fairforget.study.compare import pair_source_markdown, pair_source_run

    def change(delta: float) -> dict:
        entry = {"delta": delta, "delta_ci": [delta - 1, delta + 1], "p_value": 0.5, "mdc": 2.0}
        return {"ss_gender_distance": entry, "crows_gender": entry, "winobias": entry,
                "perplexity": {"ppl_change_pct": 1.0, "ppl_change_pct_ci": [0.0, 2.0]}}

    text = pair_source_markdown({"cda": change(-1.0), pair_source_run("cda", "stereoset_selection"): change(-4.0),
                                 "leace": change(0.0), pair_source_run("ghost", "stereoset_selection"): change(3.0)})
    assert "| cda | default pairs | -1.00 [-2.00, +0.00] p=0.5 mdc=2.00 |" in text
    assert "| cda | stereoset_selection | -4.00 [-5.00, -3.00]" in text and "ghost" not in text and "leace" not in text
    assert pair_source_markdown({"cda": change(-1.0)}) == ""
