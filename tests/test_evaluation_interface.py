"""The one evaluation interface: every registered evaluation loads, evaluates, writes the same run-folder schema,
reads it back and compares a run with itself as no change."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_script
from fairforget.artifacts import write_json
from fairforget.errors import FairforgetError
from fairforget.evals.interface import SCHEMA_KEYS
from fairforget.evals.registry import EVALUATIONS, evaluation
from fairforget.run_folders import RUN_MARKER, run_folder

DATA = {"stereoset": ("stereoset/dev.json", {"limit": 12}),
        "crows": ("crows_pairs/data/crows_pairs_anonymized.csv", {"limit": 10}),
        "bbq": ("bbq", {"categories": ["Age"], "per_category": 6}),
        "winobias": ("winobias/data", {"limit": 10}),
        "perplexity": ("", {"limit": 6})}  # neutral texts ship with Python: no data path
OPTIONS = {"stereoset": {}, "crows": {"score": "sum"}, "bbq": {"mode": "letter", "chat_template": "off"},
           "winobias": {}, "perplexity": {}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tokenizer, shared_data):
    """Each registered evaluation run through the interface on the tiny Llama: (folder, metrics, items)."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for name, ev in EVALUATIONS.items():
        path, load_options = DATA[name]
        data = ev.load(shared_data / path, **load_options)
        metrics, items = ev.evaluate(tiny_models["llama"], tokenizer, data.examples, batch_size=4, n_boot=20, seed=0,
                                     **OPTIONS[name])
        ev.write_run(root / name, metrics, items, {"seed": 0, "data": [str(f) for f in data.files]}, "tiny")
        done[name] = (root / name, metrics, items)
    return done


def test_every_evaluation_is_registered_under_its_name():
    assert list(EVALUATIONS) == ["stereoset", "crows", "bbq", "winobias", "perplexity"]
    assert all(ev.name == name for name, ev in EVALUATIONS.items())
    staged = [ev for ev in EVALUATIONS.values() if ev.script]  # perplexity has no stage: the suite scores it
    assert all(ev.script.endswith(".py") for ev in staged) and len({ev.script for ev in staged}) == 4
    assert EVALUATIONS["perplexity"].script == "" and len(staged) == 4
    with pytest.raises(FairforgetError, match="unknown evaluation 'winogender'"):
        evaluation("winogender")


def test_every_evaluation_writes_the_same_run_folder_schema(runs):
    shared = {"metrics.json", "items.jsonl", "metrics.csv", RUN_MARKER}
    for name, (folder, metrics, items) in runs.items():
        files = {p.name for p in folder.iterdir()}
        assert shared <= files, name
        assert any(f.endswith(".png") for f in files), name
        written = json.loads((folder / "metrics.json").read_text())
        assert tuple(written) == SCHEMA_KEYS
        assert written["evaluation"] == name and written["provenance"]["seed"] == 0
        assert written["metrics"] == json.loads(json.dumps(metrics))
        lines = (folder / "items.jsonl").read_text().splitlines()
        assert len(lines) == len(items) and json.loads(lines[0]) == json.loads(json.dumps(items[0]))
        run = EVALUATIONS[name].read_run(folder, "tiny")
        assert run.metrics == written["metrics"] and run.label == "tiny"
        assert EVALUATIONS[name].read_items(folder) == json.loads(json.dumps(items))


def _assert_no_change(node, where: str = "") -> int:
    """Every paired change in a comparison is zero (or NaN where the metric itself is NaN), every McNemar
    count of flipped decisions is zero, every minimum detectable change is zero (nothing flipped, so the interval
    under no change has no width); returns how many changes were checked."""
    checked = 0
    if not isinstance(node, dict):
        return 0
    for key, value in node.items():
        if key == "mdc":
            values = list(value.values()) if isinstance(value, dict) else [value]
            assert all(v == 0 or math.isnan(v) for v in values), f"{where}/mdc: {value}"
            checked += 1
        elif isinstance(value, dict):
            checked += _assert_no_change(value, f"{where}/{key}")
        elif key in ("true_before_only", "true_after_only"):
            assert value == 0, f"{where}/{key}"
        elif key == "p_value":
            assert value == 1.0, f"{where}/{key}"
        elif "delta" in key or key.startswith("ppl_change"):
            values = value if key.endswith("_ci") else [value]
            before = node.get(key.replace("_delta", "_before").replace("_ci", ""), 0.0)
            assert all(v == 0 or (math.isnan(v) and math.isnan(before)) for v in values), f"{where}/{key}: {value}"
            checked += 1
    return checked


def test_a_run_compared_with_itself_shows_no_change(runs):
    for name, (folder, _, items) in runs.items():
        ev = EVALUATIONS[name]
        comparison = ev.compare(ev.read_items(folder), items, n_boot=20, seed=0)
        assert _assert_no_change(comparison) >= 2, name
        assert "mdc" in comparison["overall"] or name == "perplexity", name  # no decisions flip in perplexity
        header, rows = ev.comparison_rows(comparison, overall_only=True)
        assert len(rows) == 1 and rows[0][0] == "overall" and len(rows[0]) == len(header)
        assert "items in common" in ev.comparison_markdown(comparison, folder, folder)


def test_a_run_of_another_evaluation_or_layout_is_refused(runs, tmp_path):
    crows_folder = runs["crows"][0]
    with pytest.raises(FairforgetError, match="is a 'crows' run, not 'stereoset'"):
        EVALUATIONS["stereoset"].read_run(crows_folder, what="--compare-to")
    with run_folder(tmp_path / "old") as tmp:  # a complete run in the layout before the shared schema
        write_json(tmp / "metrics.json", {**runs["crows"][1], "provenance": {}})
    with pytest.raises(FairforgetError, match="older fairforget, run its stage again"):
        EVALUATIONS["crows"].read_run(tmp_path / "old")


def test_stage_20_compares_with_an_earlier_run(tmp_path, tokenizer, shared_data):
    from fairforget.tiny import save_tiny_model

    model = save_tiny_model("llama", tokenizer, tmp_path / "tiny")
    stage = load_script("20_evaluate_bbq.py")
    common = dict(model=str(model), data_dir=shared_data / "bbq", categories=["Age"], per_category=6, n_boot=20,
                  device="cpu", chat_template="off", quiet=True)
    stage.main(stage.Config(**common, out=tmp_path / "first"))
    stage.main(stage.Config(**common, out=tmp_path / "second", compare_to=tmp_path / "first"))
    written = json.loads((tmp_path / "second" / "comparison.json").read_text())
    assert written["evaluation"] == "bbq" and written["before"] == str(tmp_path / "first")
    assert _assert_no_change(written["comparison"]) > 0
    crows = load_script("15_evaluate_crows.py")
    crows.main(crows.Config(model=str(model), data=shared_data / "crows_pairs/data/crows_pairs_anonymized.csv",
                            limit=6, n_boot=20, device="cpu", out=tmp_path / "crows", quiet=True))
    with pytest.raises(FairforgetError, match="is a 'crows' run, not 'bbq'"):  # refused before any scoring
        stage.main(stage.Config(**common, out=tmp_path / "third", compare_to=tmp_path / "crows"))
    assert not (tmp_path / "third").exists()
