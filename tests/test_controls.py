"""The controls preset (issue 23): stage 16 plants a gender bias, every registered method starts from the planted
model, and stage 30 with --start gives the share of the planted shift each method removes."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from fairforget.config import build_parser, parse_config
from fairforget.evals.suite import weights_digest
from fairforget.layout import CONFIGS, Layout
from fairforget.methods.head_controls import compare_choices
from fairforget.methods.registry import METHODS, Knob, MethodSpec, register_method
from fairforget.study.pipeline import Stage, build_plan
from fairforget.tiny import save_tiny_model

README_RECIPE = {"kind": "gender", "source": "stereoset_selection", "epochs": 2, "lr": 2e-4, "dose_every": 6,
                 "dose_limit": 40, "ppl_limit": 10, "min_shift": 11, "heldout": False}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    model: str
    scale: float


@pytest.fixture
def toy():
    """A method registered only here: the controls plan must run it too."""
    register_method(MethodSpec(name="toy", title="a toy method", script="31_cda.py", config=ToyConfig,
                               knobs=(Knob("epochs"),), zero_flags={"epochs": 0}, inputs=lambda lay: [lay.pairs],
                               data_flags=lambda lay: {"pairs": lay.pairs}, sizes={"epochs": 3}))
    yield METHODS["toy"]
    METHODS.pop("toy")


def test_controls_plan_plants_runs_every_method_on_the_planted_model_and_compares_with_the_start(tmp_path, toy):
    layout = Layout(data=tmp_path / "data", outputs=tmp_path / "outputs", models=tmp_path / "models")
    spec = "embedded:smollm2-135m-instruct"
    stages = build_plan("controls", layout=layout)
    by = {s.name: s for s in stages}
    names = [s.name for s in stages]
    plant = by["16 plant gender bias"]
    assert {k: plant.args[k] for k in README_RECIPE} == README_RECIPE and plant.args["model"] == spec
    planted = Path(plant.args["out"])
    assert planted in plant.outputs and "--no-heldout" in plant.argv()

    methods_plan = {s.name: s for s in build_plan("methods", layout=layout)}
    method_stages = [s for s in stages if s.script not in ("10_preprocess_winogender.py", "16_plant_bias.py",
                                                           "30_compare_methods.py") and s.pipeline == "controls"]
    assert len(method_stages) == len(METHODS) and "31 toy" in names  # every registered method, the toy one too
    preset = json.loads((CONFIGS / "controls.json").read_text())["stages"]
    for stage in method_stages:
        name = stage.name.split(" ", 1)[1]
        assert stage.args["model"] == str(planted) and planted in stage.inputs, name
        assert names.index("16 plant gender bias") < names.index(stage.name) < names.index("30 compare methods")
        # its registered sizes, then the preset's flags of its script
        expected = {**METHODS[name].sizes, **preset.get(stage.script, {})}
        assert {k: stage.args[k] for k in expected} == expected, name
        # its own folders, none of them one the methods preset writes
        for out in stage.outputs:
            assert layout.models / "controls" in out.parents or layout.outputs / "controls" in out.parents, out
        theirs = set(methods_plan[stage.name].outputs)
        assert not theirs & set(stage.outputs), name
    assert by["31 toy"].args["epochs"] == 3 and by["36 leace"].args["fit_limit"] == preset["36_projection.py"]["fit_limit"]

    compare = by["30 compare methods"]
    assert compare.args["before"] == str(planted) and compare.args["start"] == spec
    folders = dict(entry.split("=", 1) for entry in compare.args["methods"])
    assert list(folders) == list(METHODS)
    assert all(Path(f) in compare.inputs for f in folders.values()) and planted in compare.inputs
    assert Path(compare.args["out"]) == layout.outputs / "controls" / "comparison"
    assert not set(compare.outputs) & set(methods_plan["30 compare methods"].outputs)
    for key, value in preset["30_compare_methods.py"].items():
        assert compare.args[key] == value
    # every command parses with its stage's Config
    for stage in stages:
        parsed = vars(build_parser(load_script(stage.script).Config()).parse_args(stage.argv()))
        assert set(parsed) - {"config"} == {k for k, v in stage.args.items() if v is not None} - {"config"}, stage.name


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tokenizer, shared_data):
    """Stage 30 with --start on tiny models: "planted" (seed 1) as before, "start" (seed 0) as --start, and as
    methods the start model itself, the planted model itself and a third model."""
    root = tmp_path_factory.mktemp("controls")
    start = str(save_tiny_model("llama", tokenizer, root / "start", seed=0))
    planted = str(save_tiny_model("llama", tokenizer, root / "planted", seed=1))
    other = str(save_tiny_model("llama", tokenizer, root / "other", seed=2))
    stage30 = load_script("30_compare_methods.py")
    out = root / "compare"
    cfg = parse_config(stage30.Config(), [
        "--before", planted, "--start", start, "--methods", f"as_start={start}", f"as_planted={planted}",
        f"other={other}", "--stereoset", str(shared_data / "stereoset/dev.json"),
        "--crows", str(shared_data / "crows_pairs/data/crows_pairs_anonymized.csv"),
        "--winobias", str(shared_data / "winobias/data"), "--winobias-limit", "24", "--bbq-dir",
        str(shared_data / "bbq"), "--stereoset-limit", "8", "--gender-limit", "40", "--crows-limit", "8",
        "--bbq-per-category", "1", "--ppl-limit", "3", "--n-boot", "50", "--device", "cpu", "--out", str(out)])
    stage30.main(cfg)
    return out, {"start": start, "planted": planted, "other": other}


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "shares.csv") as handle:
        return {(r["method"], r["measure"]): r for r in csv.DictReader(handle)}


def _pro(out: Path, spec: str, kind: str) -> dict:
    """Per item, whether the stereotyped side won, recomputed from the per-item scores stage 30 cached."""
    lines = (out / "scores" / weights_digest(spec)[:16] / f"{kind}_items.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    if kind == "stereoset":
        by: dict = {}
        for it in items:
            if it["bias_type"] == "gender":
                by.setdefault(it["example_id"], {})[it["gold_label"]] = it["score"]
        return {e: s["stereotype"] > s["anti-stereotype"] for e, s in by.items()}
    return {it["id"]: it["pro_preferred"] for it in items}


def test_share_is_100_for_the_start_model_0_for_the_planted_one_and_by_hand_for_another(compared):
    out, specs = compared
    rows = _rows(out)
    gender_shift = float(rows[("as_start", "stereoset_gender")]["planted_shift"])
    assert gender_shift != 0  # the tiny "planted" model differs from the start model on these items
    for measure in ("stereoset_gender", "stereoset_overall", "crows_gender", "winobias"):
        as_start, as_planted = rows[("as_start", measure)], rows[("as_planted", measure)]
        if float(as_start["planted_shift"]) == 0:
            assert as_start["share_removed_pct"] == "" and as_planted["share_removed_pct"] == ""  # undefined
            continue
        assert float(as_start["share_removed_pct"]) == pytest.approx(100.0), measure
        assert float(as_planted["share_removed_pct"]) == pytest.approx(0.0), measure
        assert [float(as_start["ci_low"]), float(as_start["ci_high"])] == pytest.approx([100.0, 100.0])
        assert [float(as_planted["ci_low"]), float(as_planted["ci_high"])] == pytest.approx([0.0, 0.0])
        assert float(as_start["d_ppl_pct"]) != 0 and float(as_planted["d_ppl_pct"]) == pytest.approx(0.0)
    # the third model, by hand from the per-item scores: micro SS on the held-out gender examples
    for kind, measure in (("stereoset", "stereoset_gender"), ("winobias", "winobias")):
        pro = {name: _pro(out, spec, kind) for name, spec in specs.items()}
        ids = sorted(pro["start"])
        ss = {name: 100.0 * np.mean([p[i] for i in ids]) for name, p in pro.items()}
        row = rows[("other", measure)]
        assert float(row["bias_start"]) == pytest.approx(ss["start"]) and int(row["n"]) == len(ids)
        if ss["planted"] != ss["start"]:
            expected = 100.0 * (ss["planted"] - ss["other"]) / (ss["planted"] - ss["start"])
            assert float(row["share_removed_pct"]) == pytest.approx(expected), measure
            assert float(row["ci_low"]) <= expected <= float(row["ci_high"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["start"] == specs["start"] and set(metrics["shares"]) == {"as_start", "as_planted", "other"}
    # the start model scored once more as --start: the same levels as when it is named as a method
    assert metrics["start_levels"]["stereoset"] == metrics["levels"]["as_start"]["stereoset"]
    summary = (out / "summary.md").read_text()
    assert "## Share of the planted shift removed" in summary
    assert "| as_start | 100.0 [100.0, 100.0] |" in summary and "| as_planted | 0.0 [0.0, 0.0] |" in summary


def test_report_and_findings_show_the_shares(compared, tmp_path):
    from fairforget.study.findings import collect_changes, collect_shares, findings_block
    from fairforget.study.report import build_report

    out, _ = compared
    stage = Stage("30 compare methods", "30_compare_methods.py", {"before": "planted", "out": out}, [], [out],
                  "controls")
    text = build_report([stage], [], tmp_path / "report.md", "test", 1.0, tmp_path / "no-data")
    assert "## Positive controls: every method on a planted gender bias (planted)" in text
    assert "### Share of the planted shift removed" in text and "shares.csv" in text
    shares = collect_shares([stage])
    assert [s.model for s in shares] == ["as_start (stage 30)", "as_planted (stage 30)", "other (stage 30)"]
    block = findings_block(collect_changes([stage]), shares)
    line = next(line for line in block.splitlines() if "Positive control" in line)
    assert "as_start (stage 30) 100.0 [100.0, 100.0]%" in line and "as_planted (stage 30) 0.0 [0.0, 0.0]%" in line
    assert line in text and f"{shares[0].n} held-out examples" in line


def test_controls_preset_end_to_end_on_a_tiny_model(tmp_path, tokenizer, shared_data):
    """The whole plan after the data and model steps, each stage its own subprocess as run_pipeline runs it, on a
    tiny start model with a copy of the preset at tiny sizes (the methods' rows of the contract test)."""
    from test_method_contract import TEST_CASES

    from fairforget.study.pipeline import run_stages

    data = tmp_path / "data"
    data.mkdir()
    for name in ("stereoset", "bbq", "winobias", "crows_pairs", "winogender"):
        (data / name).symlink_to(shared_data / name)
    layout = Layout(data=data, outputs=tmp_path / "outputs", models=tmp_path / "models")
    start = str(save_tiny_model("llama", tokenizer, tmp_path / "start", seed=0))
    preset = json.loads((CONFIGS / "controls.json").read_text())
    preset["stages"] = {METHODS[name].script: flags for name, flags in TEST_CASES.items()}
    preset["stages"]["16_plant_bias.py"] = {"epochs": 1, "batch_size": 16, "lr": 5e-3, "dose_every": 0,
                                            "dose_limit": 4, "ppl_limit": 3, "eval_batch_size": 8}
    preset["stages"]["30_compare_methods.py"] = {"stereoset_limit": 8, "gender_limit": 12, "crows_limit": 8,
                                                 "winobias_limit": 8, "bbq_per_category": 1, "ppl_limit": 3,
                                                 "n_boot": 20}
    path = tmp_path / "tiny_controls.json"
    path.write_text(json.dumps(preset))
    stages = [s for s in build_plan(str(path), ["pcgu"], device="cpu", layout=layout, pcgu_model=start)
              if s.script not in ("00_fetch_data.py", "01_prepare_model.py")]  # the gender part
    lines: list[str] = []
    results = run_stages(stages, cwd=tmp_path, log=lines.append, env={"FAIRFORGET_QUIET": "1"})
    assert [r.status for r in results] == ["ran"] * len(stages), "\n".join(lines[-30:])
    out = layout.outputs / "controls" / "comparison"
    rows = _rows(out)
    assert {method for method, _ in rows} == set(METHODS)
    planted = json.loads((layout.outputs / "planted" / "controls-gender" / "method.json").read_text())
    assert planted["steps"] > 0
    for name in METHODS:  # each method's record is its run on the planted model
        record = json.loads((layout.outputs / "controls" / name / "method.json").read_text())
        assert record["provenance"]["config"]["model"] == str(layout.models / "planted" / "controls-gender"), name
    assert "## Share of the planted shift removed" in (out / "summary.md").read_text()


def test_controls_bbq_part_plants_the_bbq_bias_and_prunes_heads_on_it(tmp_path, tokenizer, shared_data):
    """--pipelines bbq: stage 16 --kind bbq (the README recipe), then stage 22 with the BBQ signal and its controls on
    the planted model, into its own folders; run end to end on a tiny model at tiny sizes."""
    from test_method_contract import TEST_CASES

    from fairforget.study.pipeline import run_stages

    layout = Layout(data=tmp_path / "data", outputs=tmp_path / "outputs", models=tmp_path / "models")
    preset = json.loads((CONFIGS / "controls.json").read_text())
    stages = [s for s in build_plan("controls", ["bbq"], layout=layout) if s.pipeline == "controls_bbq"]
    plant, heads, unplanted = stages
    recipe = {"kind": "bbq", "train_per_category": 16, "eval_per_category": 12, "epochs": 3, "batch_size": 8,
              "lr": 5e-4}
    assert {k: plant.args[k] for k in recipe} == recipe and len(plant.args["categories"]) == 6
    planted = Path(plant.args["out"])
    assert heads.script == "22_mitigate_heads.py" and heads.args["model"] == str(planted) and planted in heads.inputs
    assert heads.args["signal"] == "bbq" and heads.args["eval_per_category"] == plant.args["eval_per_category"]
    # stage 22 on every category: it splits the scenarios of the categories it loads, and only all of them give
    # the split stage 16 planted on (its mitigation side), so no planted scenario is among stage 22's held-out ones
    assert "categories" not in heads.args
    # the same stage 22 on the unplanted model, into its own folders: does planting change the chosen heads?
    assert unplanted.script == heads.script and unplanted.args["model"] == preset["bbq_model"]
    assert {k: v for k, v in unplanted.args.items() if k not in ("model", "out", "log_dir", "models_dir")} == \
        {k: v for k, v in heads.args.items() if k not in ("model", "out", "log_dir", "models_dir")}
    assert not set(unplanted.outputs) & set(heads.outputs)
    gender = {s.name: s for s in build_plan("controls", ["pcgu"], layout=layout)}
    assert not {p for s in gender.values() for p in s.outputs} & {p for s in stages for p in s.outputs}
    assert "16 plant BBQ bias" not in gender

    data = tmp_path / "data"
    data.mkdir()
    for name in ("stereoset", "bbq"):
        (data / name).symlink_to(shared_data / name)
    start = str(save_tiny_model("llama", tokenizer, tmp_path / "start", seed=0))
    tiny = {"categories": ["Age", "Gender_identity"]}
    preset["bbq_stages"] = {
        "16_plant_bias.py": {**tiny, "train_per_category": 2, "eval_per_category": 2, "epochs": 1, "batch_size": 4,
                             "n_boot": 20},
        "22_mitigate_heads.py": {**{k: v for k, v in TEST_CASES["head_pruning"].items() if k != "categories"},
                                 "signal": "bbq", "mitigation_per_category": 4, "n_boot": 20}}  # >= 3 to correlate
    path = tmp_path / "tiny_controls.json"
    path.write_text(json.dumps(preset))
    stages = [s for s in build_plan(str(path), ["bbq"], device="cpu", layout=layout, bbq_model=start)
              if s.pipeline == "controls_bbq"]
    lines: list[str] = []
    results = run_stages(stages, cwd=tmp_path, log=lines.append, env={"FAIRFORGET_QUIET": "1"})
    assert [r.status for r in results] == ["ran", "ran", "ran"], "\n".join(lines[-30:])
    out = Path(stages[1].args["out"])
    assert (out / "controls.csv").is_file() and json.loads((out / "metrics.json").read_text())["heads_pruned"] > 0
    overlap = compare_choices(out, Path(stages[2].args["out"]))
    assert overlap["n_heads"] == 2 * 4 and all(overlap["heads"]) and 0 <= overlap["jaccard"] <= 1
    assert set(overlap["common"]) == set(overlap["heads"][0]) & set(overlap["heads"][1])
    assert -1 <= overlap["signal_spearman"] <= 1
    from fairforget.study.report import build_report

    text = build_report(stages, results, tmp_path / "report.md", "test", 1.0, data)
    section = text[text.index("### Chosen heads: planted against unplanted model"):]
    assert f"Jaccard overlap of the chosen heads {overlap['jaccard']:.2f}" in section
    assert text.count("### Head pruning and recovery (22 ") == 2
    shift = json.loads((layout.outputs / "planted" / "controls-bbq" / "shift.json").read_text())
    assert shift["n_train"] == 4 and set(shift["shift"]["planted"]) == {"Age", "Gender_identity", "overall"}
