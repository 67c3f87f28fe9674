"""One contract for every registered method (peft's TEST_CASES): run through its own stage script on a tiny model,
it saves its output with its typed config, the output reloads through the one loader every evaluation uses, its
zero-strength setting gives the start model's scores, and its record has provenance. A method registered only
here appears in the methods plan and in stage 30's table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import load_script
from fairforget.artifacts import read_json, write_json
from fairforget.config import parse_config, run_script
from fairforget.evals.perplexity import GENDERED, load_neutral_texts
from fairforget.evals.stereoset import evaluate_stereoset, load_stereoset, select_half, stratified_limit
from fairforget.layout import Layout
from fairforget.methods.registry import (CONFIG_FILE, METHODS, Knob, MethodSpec, load_output, register_method,
                                         save_method_config, write_method_record)
from fairforget.models import load_model
from fairforget.study.pipeline import Stage, build_plan
from fairforget.tiny import save_tiny_model

# tiny sizes per method; a new method needs a row here (the first test says so)
TEST_CASES = {
    "cda": {"limit": 16},
    "task_vector": {"limit": 16, "epochs": 1, "selection_limit": 8},
    "damage_reference": {"limit": 16, "epochs": 1, "selection_limit": 8},
    "self_debias": {"selection_limit": 8, "eval_batch_size": 4},
    "bias_unlearn": {"limit": 16, "check_pairs": 8},
    "pcgu": {"epochs": 1, "selection_limit": 8, "eval_batch_size": 8},
    **{name: {"fit_limit": 12, "selection_limit": 8, "eval_batch_size": 8} for name in ("sentence_debias", "inlp", "leace")},
    "head_pruning": {"mitigation_per_category": 1, "eval_per_category": 1, "signal_limit": 8, "k": 2,
                     "categories": ["Age", "Gender_identity"], "dose_ks": [2], "random_draws": 1},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tokenizer, shared_data):
    """A data folder (the shared datasets and the stage-10 pair files), a tiny start model and its scores."""
    root = tmp_path_factory.mktemp("study")
    data = root / "data"
    data.mkdir()
    for name in ("stereoset", "bbq", "winobias", "crows_pairs", "winogender"):
        (data / name).symlink_to(shared_data / name)
    layout = Layout(data=data, outputs=root / "outputs", models=root / "models")
    stage10 = load_script("10_preprocess_winogender.py")
    for source, out in (("winogender", layout.pairs), ("group_first", layout.group_first_pairs)):
        run_script(stage10.main, stage10.Config(), ["--winogender-dir", str(data / "winogender" / "data"),
                                                    "--out-dir", str(out.parent), "--sources", source,
                                                    "--out-name", out.name])
    start = str(save_tiny_model("llama", tokenizer, root / "start", seed=0))
    examples = stratified_limit(select_half(load_stereoset(layout.stereoset), "heldout", 0), 12, 0)
    return layout, start, examples, _scores(start, examples)


def _scores(spec: str, examples) -> list[float]:
    loaded = load_output(spec, "cpu")
    _, items = evaluate_stereoset(loaded.model, loaded.tokenizer, examples, batch_size=4, n_boot=10)
    return [it["score"] for it in items]


def _run(method: MethodSpec, layout: Layout, start: str, **overrides) -> dict:
    """The method's stage run in-process with the flags the methods plan would give it (tiny sizes)."""
    flags = method.flags(start, layout, device="cpu", **overrides)
    script = load_script(method.script)
    script.main(parse_config(script.Config(), Stage(method.name, method.script, flags).argv()))
    return flags


def test_every_registered_method_has_a_test_case():
    assert set(METHODS) == set(TEST_CASES)


@pytest.mark.parametrize("name", list(TEST_CASES))
def test_zero_strength_run_saves_reloads_and_returns_the_start_scores(name, study):
    layout, start, examples, start_scores = study
    method = METHODS[name]
    flags = _run(method, layout, start, **TEST_CASES[name], **method.zero_flags)
    folder = method.folder(layout, flags)
    saved = read_json(folder / CONFIG_FILE)
    assert saved["method"] == name and saved["output"] == method.output
    assert set(saved["config"]) == {f.name for f in dataclasses.fields(method.config)}
    scores = _scores(str(folder), examples)
    if method.output == "model":
        assert scores == start_scores  # exactly: the zero setting is the start model
    else:  # a wrapper renormalises the distribution it passes through
        assert scores == pytest.approx(start_scores, abs=1e-5)
    record = read_json(method.log_dir(layout) / "method.json")
    assert record["method"] == name and record["wall_seconds"] >= 0 and record["peak_memory_mib"] > 0
    assert {"git_commit", "packages", "config"} <= set(record["provenance"])
    for knob in method.knobs:
        assert knob.name in {f.name for f in dataclasses.fields(load_script(method.script).Config)}


def test_damage_reference_trains_on_retain_half_neutral_text_at_the_task_vectors_token_budget(study, tokenizer,
                                                                                            tmp_path):
    layout, start, _, _ = study
    for name in ("task_vector", "damage_reference"):
        _run(METHODS[name], layout, start, **TEST_CASES[name], **METHODS[name].zero_flags,
             out=tmp_path / name / "model", log_dir=tmp_path / name / "log")
    advantaged = read_json(tmp_path / "task_vector" / "log" / "train_texts.json")
    neutral = read_json(tmp_path / "damage_reference" / "log" / "train_texts.json")
    budget = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in advantaged)
    used = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in neutral)
    record = read_json(tmp_path / "damage_reference" / "log" / "method.json")
    assert record["method"] == "damage_reference" and record["token_budget"] == budget
    assert record["train_tokens"] == used and budget - 120 < used <= budget  # filled to within one text
    assert all(row["perplexity"] > 0 for row in record["selection"])  # the default perplexity budget is measured
    assert set(neutral) <= set(load_neutral_texts("retain")) and not set(neutral) & set(load_neutral_texts("heldout"))
    assert not any(GENDERED.search(text) for text in neutral)
    saved = read_json(tmp_path / "damage_reference" / "model" / CONFIG_FILE)
    assert saved["method"] == "damage_reference" and saved["config"]["source"] == "neutral"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    model: str
    scale: float


def test_a_method_registered_here_appears_in_the_plan_and_in_stage_30(study, tmp_path, tokenizer):
    layout, start, _, _ = study
    toy = MethodSpec(name="toy", title="a toy method", script="31_cda.py", config=ToyConfig,
                     knobs=(Knob("epochs"),), zero_flags={"epochs": 0}, inputs=lambda lay: [lay.pairs],
                     data_flags=lambda lay: {"pairs": lay.pairs})
    register_method(toy)
    try:
        check_toy_in_plan_and_stage_30(study, tmp_path, tokenizer)
    finally:
        METHODS.pop("toy")


def check_toy_in_plan_and_stage_30(study, tmp_path, tokenizer):
    layout, start, _, _ = study
    plan = build_plan("methods", layout=layout)
    assert "31 toy" in [stage.name for stage in plan]
    compare = next(stage for stage in plan if stage.script == "30_compare_methods.py")
    assert any(entry.startswith("toy=") for entry in compare.args["methods"])
    stage30 = load_script("30_compare_methods.py")
    assert any(entry.startswith("toy=") for entry in stage30.Config().methods)
    folder = save_tiny_model("llama", tokenizer, tmp_path / "toy_model", seed=1)
    save_method_config(folder, "toy", ToyConfig(model=start, scale=1.0))
    write_method_record(tmp_path / "toy_log", "toy", ToyConfig(model=start, scale=1.0), 1.0, [])
    out = tmp_path / "compare"
    cfg = parse_config(stage30.Config(), [
        "--before", start, "--methods", f"toy={folder}", "--records", f"toy={tmp_path / 'toy_log' / 'method.json'}",
        "--stereoset", str(layout.stereoset), "--crows", str(layout.crows), "--winobias", str(layout.winobias),
        "--winobias-limit", "8", "--bbq-dir", str(layout.bbq),
        "--stereoset-limit", "8", "--gender-limit", "6", "--crows-limit", "8", "--bbq-per-category", "1",
        "--ppl-limit", "3", "--n-boot", "20", "--device", "cpu", "--out", str(out)])
    stage30.main(cfg)
    assert [row.split(",")[0] for row in (out / "summary.csv").read_text().splitlines()[1:]] == ["before", "toy"]


@pytest.mark.parametrize("script,flags", [
    ("13_evaluate_stereoset.py", ["--limit", "6"]),
    ("15_evaluate_crows.py", ["--limit", "6"]),
    ("20_evaluate_bbq.py", ["--per-category", "1", "--categories", "Age", "--mode", "answer"]),
])
def test_evaluation_stages_load_every_output_kind(script, flags, study, tmp_path, tokenizer):
    """A model folder, a peft adapter folder and a scoring-wrapper folder (Self-Debias) through stages 13, 15, 20."""
    layout, start, _, _ = study
    from fairforget.methods.lora import add_lora, save_adapter, target_modules
    from fairforget.methods.self_debias import SelfDebiasConfig

    base = load_model(start, "cpu")
    adapter = tmp_path / "adapter"
    save_adapter(add_lora(base.model, target_modules(base.model), 2, 4, 0.0, 0), base.tokenizer, adapter, start)
    wrapper = tmp_path / "wrapper"
    save_method_config(wrapper, "self_debias", SelfDebiasConfig(model=start, bias_types=["gender"]))
    data = {"13_evaluate_stereoset.py": ["--data", str(layout.stereoset)],
            "15_evaluate_crows.py": ["--data", str(layout.crows)],
            "20_evaluate_bbq.py": ["--data-dir", str(layout.bbq)]}[script]
    stage = load_script(script)
    for kind, model in (("model", start), ("adapter", adapter), ("wrapper", wrapper)):
        out = tmp_path / f"run_{kind}"
        stage.main(parse_config(stage.Config(), ["--model", str(model), *data, *flags, "--n-boot", "10",
                                                 "--device", "cpu", "--out", str(out), "--batch-size", "4"]))
        assert (out / "metrics.json").is_file() and (out / "items.jsonl").stat().st_size > 0


def test_head_pruning_saves_each_dose_k_pruned_model_as_a_setting(study, tmp_path):
    """Stage 22 --settings-dir: every --dose-ks k's pruned model (no recovery) as k_<k>; at the run's own k its
    weights are the pruned model's, and its config says which k and that nothing was recovered."""
    from fairforget.evals.suite import weights_digest
    from fairforget.study.frontier import setting_folders

    layout, start, _, _ = study
    settings = tmp_path / "settings"
    flags = _run(METHODS["head_pruning"], layout, start, **{**TEST_CASES["head_pruning"], "dose_ks": [1, 2]},
                 settings_dir=settings, evals=["bbq", "perplexity"], localize_per_category=0,
                 out=tmp_path / "run", models_dir=tmp_path / "models")
    assert list(setting_folders("head_pruning", settings)) == ["head_pruning@k_1", "head_pruning@k_2"]
    pruned = next((Path(flags["models_dir"]) / "pruned").iterdir())
    weights = "model.safetensors"
    assert weights_digest(str(settings / "k_2" / weights)) == weights_digest(str(pruned / weights))  # k 2: the run's
    assert weights_digest(str(settings / "k_1" / weights)) != weights_digest(str(pruned / weights))
    config = read_json(settings / "k_1" / CONFIG_FILE)["config"]
    assert (config["k"], config["recovery"], config["select"]) == (1, "none", "top-k")


def test_saved_settings_are_the_models_each_strength_gives_and_stage_30_draws_their_frontier(study, tmp_path,
                                                                                          capsys):
    """--settings-dir saves every nonzero strength's model (the chosen one: the stage's output exactly); stage 30
    --frontiers scores each as name@setting and writes frontier.csv, one figure
    per measure and the summary section, the chosen setting marked, the damage reference as the curve to beat."""
    from fairforget.evals.suite import weights_digest

    layout, start, _, _ = study
    frontiers, records = [], []
    settings_of = {"cda": ({"epochs": 2}, ["epochs_1", "epochs_2"]),  # each epoch's adapter, along training
                   "bias_unlearn": ({"epochs": 2}, ["epochs_1", "epochs_2"]),
                   "pcgu": ({"evals_per_epoch": 2}, None),  # every evaluation point's model: step_<N>
                   "task_vector": ({"lambdas": [0.5, 1.0]}, ["lambda_0.5", "lambda_1"]),
                   "damage_reference": ({"lambdas": [0.5, 1.0]}, ["lambda_0.5", "lambda_1"]),
                   "leace": ({"strengths": [0.5, 1.0]}, ["alpha_0.5", "alpha_1"]),
                   "self_debias": ({"decays": [10.0]}, ["decay_10", "decay_50"])}  # a settings file each, default too
    for name, (knob, expected) in settings_of.items():
        method = METHODS[name]
        settings = tmp_path / name / "settings"
        budget = ({"max_lms_drop": "none", "max_ppl_increase": "none"}  # no budget: a nonzero choice
                  if name in ("task_vector", "damage_reference", "leace", "pcgu") else {})
        _run(method, layout, start, **TEST_CASES[name], **knob, **budget, settings_dir=settings,
             out=tmp_path / name / "model", log_dir=tmp_path / name / "log")
        record = read_json(tmp_path / name / "log" / "method.json")
        if name == "pcgu":
            points = read_json(tmp_path / name / "log" / "summary.json")["epochs"]
            expected = sorted(f"step_{e['step']}" for e in points if e["step"])
            assert expected and record["chosen_setting"] in expected
        assert sorted(p.name for p in settings.iterdir()) == expected, name  # strength 0: the start, not saved
        assert weights_digest(str(settings / record["chosen_setting"])) == weights_digest(str(tmp_path / name / "model"))
        frontiers.append(f"{name}={settings}")
        records.append(f"{name}={tmp_path / name / 'log' / 'method.json'}")
    for name in ("cda", "bias_unlearn"):
        assert read_json(tmp_path / name / "settings" / "epochs_1" / CONFIG_FILE)["config"]["epochs"] == 1
    assert read_json(tmp_path / "self_debias" / "settings" / "decay_10" / CONFIG_FILE)["config"]["decay_constant"] == 10
    stage30 = load_script("30_compare_methods.py")
    out = tmp_path / "compare"
    kept_zero = read_json(tmp_path / "leace" / "log" / "method.json")
    write_json(tmp_path / "zero.json", {**kept_zero, "chosen_setting": "alpha_0"})  # as if no alpha were in budget
    stage30.main(parse_config(stage30.Config(), [
        "--before", start, "--methods", *(f"{n}={tmp_path / n / 'model'}" for n in ("task_vector", "leace")),
        f"zero={tmp_path / 'leace' / 'model'}", "--records", *records, f"zero={tmp_path / 'zero.json'}",
        "--frontiers", *frontiers,
        "--stereoset", str(layout.stereoset), "--crows", str(layout.crows), "--winobias", str(layout.winobias),
        "--winobias-limit", "8", "--bbq-dir", str(layout.bbq), "--stereoset-limit", "8", "--gender-limit", "6",
        "--crows-limit", "8", "--bbq-per-category", "1", "--bbq-gender-limit", "4", "--ppl-limit", "3",
        "--n-boot", "20", "--device", "cpu", "--out", str(out)]))
    import csv

    with open(out / "frontier.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected_rows = [(name, setting) for name in settings_of
                     for setting in sorted(p.name for p in (tmp_path / name / "settings").iterdir())]
    assert sorted((r["method"], r["setting"]) for r in rows) == sorted(expected_rows)
    assert [(r["method"], r["setting"]) for r in rows][:2] == [("cda", "epochs_1"), ("cda", "epochs_2")]  # by value
    metrics = read_json(out / "metrics.json")
    chosen = read_json(tmp_path / "task_vector" / "log" / "method.json")["chosen_setting"]
    assert metrics["changes"][f"task_vector@{chosen}"] == metrics["changes"]["task_vector"]  # same weights, same items
    assert [r.split(",")[0] for r in (out / "summary.csv").read_text().splitlines()[1:]] == ["before", "task_vector",
                                                                                          "leace", "zero"]
    # strength 0 kept: paired with before's own scores (the start exactly, by the contract), not scored again
    assert "scored as before: zero" in capsys.readouterr().out
    assert all(c.get("delta", 0) == 0 for c in metrics["changes"]["zero"].values())
    assert metrics["levels"]["zero"] == metrics["levels"]["before"]
    for stem in ("gender", "winobias", "crows_gender", "bbq_gender"):
        assert (out / f"frontier_{stem}.png").stat().st_size > 0
    bbq_gender = metrics["changes"]["leace"]["bbq_gender"]  # the sample's Gender_identity item and 4 more
    assert bbq_gender["n"] == 5 and bbq_gender["delta"] == bbq_gender["s_amb_delta"]
    assert metrics["levels"]["before"]["bbq"]["n_items"] == 11  # overall: the per-category sample alone
    assert all(r["d_bbq_gender"] != "" for r in rows)
    summary = (out / "summary.md").read_text()
    assert "## Frontiers" in summary and f"| task_vector | {chosen} * |" in summary
