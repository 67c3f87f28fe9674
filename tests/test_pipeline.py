"""The pipeline runner: the presets' plans, skip-if-done records, failures, and the report."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from fairforget.study import pipeline
from fairforget.study import stage as stage_module
from fairforget.errors import FairforgetError
from fairforget import hashing
from fairforget.hashing import Hasher
from fairforget.layout import CONFIGS, Layout
from fairforget.study.pipeline import Stage, build_plan, run_stages, why_not_done

FAKE_STAGE = '''
import argparse, pathlib, sys
p = argparse.ArgumentParser()
for name in ("--src", "--dst", "--suffix"):
    p.add_argument(name, default="")
p.add_argument("--fail", action="store_true")
a = p.parse_args()
if a.fail:
    print("error: the input is broken", file=sys.stderr); sys.exit(2)
dst = pathlib.Path(a.dst); dst.mkdir(parents=True, exist_ok=True)
(dst / "out.txt").write_text(pathlib.Path(a.src).read_text().upper() + a.suffix)
with open(dst.parent / "calls.log", "a") as h: h.write(dst.name + "\\n")
print("fake stage done")
'''


def test_quick_plan_chains_the_stages(tmp_path):
    stages = build_plan("quick", data_source=tmp_path)
    names = [s.name for s in stages]
    assert names[:3] == ["00 fetch data", "01 prepare smollm2-135m-instruct", "10 WinoGender pairs"]
    assert names.index("11 LoRA fine-tuning") < names.index("12 PCGU unlearning") < names.index("13 StereoSet debiased")
    assert names[-3:] == ["20 BBQ before", "21 localization before", "22 head pruning + recovery"]
    by = {s.name: s for s in stages}
    fetch = by["00 fetch data"].argv()
    assert fetch[fetch.index("--source") + 1] == str(tmp_path)
    lora_out = Path(by["11 LoRA fine-tuning"].args["out"])
    assert lora_out in by["12 PCGU unlearning"].inputs and lora_out in by["13 StereoSet finetuned"].inputs
    argv = by["13 StereoSet debiased"].argv()
    assert argv[argv.index("--half") + 1] == "heldout" and argv[argv.index("--limit") + 1] == "300"
    assert argv[argv.index("--compare-to") + 1].endswith("smollm2-135m-instruct-finetuned")
    # under --nproc 2 the evaluations and the fine-tuning go through torchrun, PCGU does not
    assert by["13 StereoSet base"].command(2)[1:3] == ["-m", "torch.distributed.run"]
    assert by["11 LoRA fine-tuning"].command(2)[1:3] == ["-m", "torch.distributed.run"]
    assert by["12 PCGU unlearning"].command(2)[1].endswith("12_pcgu_unlearn.py")


def test_quick_preset_runs_the_pcgu_configuration_the_ablation_chose():
    from fairforget.methods.pcgu_run import PCGU_PRESET_CONFIG

    chosen = json.loads(PCGU_PRESET_CONFIG.read_text())
    by = {s.name: s for s in build_plan("quick")}
    pcgu, pairs = by["12 PCGU unlearning"], by["10 WinoGender pairs"]
    method = ("target_tokens", "direction", "balance", "lr", "k", "epochs", "evals_per_epoch", "selection_metric",
              "selection_limit", "stop_at_parity")
    assert {k: pcgu.args[k] for k in method} == {k: chosen[k] for k in method}
    assert pcgu.args["max_lms_drop"] == 2  # the README's LMS budget: from the fine-tuned start the last point collapses
    # the pairs it reads are the group-first pairs stage 10 writes, and a planned input (so a change re-runs it)
    assert Path(pcgu.args["pairs"]).name == Path(chosen["pairs"]).name and Path(pcgu.args["pairs"]) in pcgu.inputs
    assert pairs.args["sources"] == ["group_first"] and pairs.args["out_name"] == Path(chosen["pairs"]).name


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_every_planned_command_parses_and_validates_with_its_stage_config(preset, shared_data, tmp_path,
                                                                          monkeypatch):
    """Every flag of every preset reaches its stage, and the stage's checks accept its values (the frontier preset's
    empty ``--decays`` once crashed stage 33 after 6 minutes of run); the only refusal allowed is an input that an
    earlier stage of the plan writes."""
    from fairforget.config import build_parser, parse_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(shared_data)  # the data step's layout, as after stage 00
    plan = build_plan(preset)
    written = {str(output) for stage in plan for output in stage.outputs}
    for stage in plan:
        module = load_script(stage.script)
        parsed = vars(build_parser(module.Config()).parse_args(stage.argv()))
        assert set(parsed) - {"config"} == {k for k, v in stage.args.items() if v is not None} - {"config"}, stage.name
        try:
            parse_config(module.Config(), stage.argv())
        except FairforgetError as exc:
            assert "not found" in str(exc) and any(path in str(exc) for path in written), (stage.name, str(exc))


def test_full_plan_uses_the_predecessors_models_and_every_example():
    stages = build_plan("full", ["pcgu", "bbq"])
    by = {s.name: s for s in stages}
    assert by["11 LoRA fine-tuning"].args["model"] == "state-spaces/mamba-130m-hf"
    assert by["20 BBQ before"].args["model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert "--limit" not in by["13 StereoSet base"].argv() and "--per-category" not in by["20 BBQ before"].argv()
    only_bbq = [s.pipeline for s in build_plan("full", ["bbq"])]
    assert "pcgu" not in only_bbq and "bbq" in only_bbq
    with pytest.raises(FairforgetError, match="--pipelines"):
        build_plan("quick", ["pcgu", "heads"])


def test_a_copied_preset_file_sets_the_stage_flags(tmp_path):
    preset = json.loads((pipeline.CONFIGS / "quick.json").read_text())
    preset["stages"]["20_evaluate_bbq.py"] = {"per_category": 5, "mode": "answer"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    argv = {s.name: s for s in build_plan(str(path))}["20 BBQ before"].argv()
    assert argv[argv.index("--per-category") + 1] == "5" and argv[argv.index("--mode") + 1] == "answer"
    for broken, match in (({**preset, "sizes": {}}, "unknown key"),
                          ({**preset, "stages": {"99_nothing.py": {}}}, "99_nothing.py"),
                          ({**preset, "stages": {"20_evaluate_bbq.py": [5]}}, "JSON object"),
                          ({**preset, "seeds": [0, 0]}, "distinct integers"),
                          ({**preset, "seeded": ["nope"]}, "'seeded' must list registered methods"),
                          ({**preset, "pair_sources": {"stereoset": ["cda"]}}, "'pair_sources' maps"),
                          ({**preset, "frontier": "yes"}, "'frontier' must be true or false")):
        path.write_text(json.dumps(broken))
        with pytest.raises(FairforgetError, match=match):
            build_plan(str(path))
    with pytest.raises(FairforgetError, match="unknown preset 'nope'"):
        build_plan("nope")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_STAGE)
    monkeypatch.setattr(pipeline, "SCRIPTS", scripts)
    monkeypatch.setattr(stage_module, "SCRIPTS", scripts)
    (tmp_path / "in.txt").write_text("hello")
    return tmp_path


def _stage(root: Path, **args) -> Stage:
    return Stage("fake", "fake.py", {"src": root / "in.txt", "dst": root / "run", **args}, [root / "in.txt"],
                 [root / "run"])


def _calls(root: Path) -> int:
    log = root / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_stage_is_skipped_only_while_config_inputs_and_outputs_match(fake):
    lines: list[str] = []
    run = lambda stage, force=False: run_stages([stage], force=force, log=lines.append)[0].status  # noqa: E731
    assert run(_stage(fake)) == "ran" and _calls(fake) == 1
    record = json.loads((fake / "run" / ".stage.json").read_text())
    assert record["fingerprint"]["inputs"][str(fake / "in.txt")] == __import__("hashlib").sha256(b"hello").hexdigest()
    assert run(_stage(fake)) == "skipped" and _calls(fake) == 1

    (fake / "in.txt").write_text("changed")
    assert why_not_done(_stage(fake), Hasher()).startswith("changed: input")
    assert run(_stage(fake)) == "ran" and (fake / "run" / "out.txt").read_text() == "CHANGED"
    assert run(_stage(fake, suffix="!")) == "ran"  # other arguments
    assert run(_stage(fake, suffix="!")) == "skipped"
    (fake / "run" / "out.txt").write_text("edited by hand")
    assert "modified" in why_not_done(_stage(fake, suffix="!"), Hasher())
    assert run(_stage(fake, suffix="!")) == "ran"
    assert run(_stage(fake, suffix="!"), force=True) == "ran"
    assert _calls(fake) == 5
    assert any("(not run yet)" in line for line in lines) and any("skipped" in line for line in lines)


def test_library_code_or_package_version_change_reruns_a_stage(fake, monkeypatch):
    library = fake / "lib"
    (library / "__pycache__").mkdir(parents=True)
    (library / "metric.py").write_text("SCALE = 100\n")
    monkeypatch.setattr(hashing, "LIBRARY", library)
    run = lambda: run_stages([_stage(fake)], log=lambda _: None)[0].status  # noqa: E731
    assert run() == "ran" and run() == "skipped"
    (library / "__pycache__" / "metric.cpython-311.pyc").write_bytes(b"cache")  # caches are not code
    (library / "notes.txt").write_text("not code")
    assert run() == "skipped"
    (library / "metric.py").write_text("SCALE = 1\n")
    assert why_not_done(_stage(fake), Hasher()) == "changed: library_sha256"
    assert run() == "ran" and run() == "skipped"
    monkeypatch.setattr(pipeline, "package_versions", lambda: {"torch": "0.0"})
    assert why_not_done(_stage(fake), Hasher()) == "changed: packages"
    assert _calls(fake) == 2


def test_failure_stops_the_run_and_missing_stages_are_skipped(fake):
    lines: list[str] = []
    stages = [Stage("not landed", "nope.py", {}, [], [fake / "a"]),
              Stage("needs input", "fake.py", {"src": fake / "absent.txt", "dst": fake / "b"}, [fake / "absent.txt"],
                    [fake / "b"]),
              _stage(fake, fail=True),
              _stage(fake)]
    results = run_stages(stages, log=lines.append)
    assert [r.status for r in results] == ["missing", "missing", "failed"]
    assert "not in this checkout" in lines[0] and "inputs are missing" in lines[1]
    assert results[2].note == "error: the input is broken"
    assert _calls(fake) == 0 and not (fake / "run" / ".stage.json").exists()


def test_real_stage_runs_once_then_is_skipped(tmp_path, shared_data):
    wino = shared_data / "winogender" / "data"
    stage = Stage("10 pairs", "10_preprocess_winogender.py", {"winogender_dir": wino, "out_dir": tmp_path / "p"},
                  [wino / "all_sentences.tsv", wino / "occupations-stats.tsv"], [tmp_path / "p"])
    first = run_stages([stage], log=lambda _: None, cwd=tmp_path)
    assert first[0].status == "ran", first[0].note
    assert len((tmp_path / "p" / "pairs.tsv").read_text().splitlines()) == 241  # 240 pairs and a header
    assert run_stages([stage], log=lambda _: None, cwd=tmp_path)[0].status == "skipped"


def test_report_has_tables_intervals_paired_tests_and_plots(tmp_path, tokenizer, shared_data, monkeypatch):
    from fairforget.study.report import build_report
    from fairforget.tiny import save_tiny_model

    monkeypatch.chdir(tmp_path)
    ss, cr = load_script("13_evaluate_stereoset.py"), load_script("15_evaluate_crows.py")
    stages = []
    for label, seed in (("base", 0), ("debiased", 1), ("rerun", 1)):  # rerun: the same model again, 0 flips
        model = str(save_tiny_model("gpt2", tokenizer, tmp_path / f"m{seed}", seed=seed))
        for module, script, out, data, size in (
                (ss, "13_evaluate_stereoset.py", tmp_path / "outputs/stereoset" / label,
                 shared_data / "stereoset/dev.json", {"limit": 12}),
                (cr, "15_evaluate_crows.py", tmp_path / "outputs/crows" / label,
                 shared_data / "crows_pairs/data/crows_pairs_anonymized.csv", {"limit": 10})):
            module.main(module.Config(model=model, data=data, out=out, n_boot=20, device="cpu", **size))
            stages.append(Stage(f"{script[:2]} x {label}", script, {"out": out}, [], [out], "pcgu"))
    results = [pipeline.StageResult(s.name, s.pipeline, "ran", 1.0, "", f"scripts/{s.script}") for s in stages]
    report = tmp_path / "outputs" / "report.md"
    text = build_report(stages, results, report, "test", 12.0, shared_data)
    assert report.read_text() == text
    assert "### StereoSet" in text and "### CrowS-Pairs" in text and "## Provenance" in text
    ss_base = json.loads((tmp_path / "outputs/stereoset/base/metrics.json").read_text())["metrics"]["overall"]["all"]
    assert f"{ss_base['ss']:.2f} [{ss_base['ss_ci'][0]:.2f}, {ss_base['ss_ci'][1]:.2f}]" in text
    assert "| base -> debiased | overall |" in text  # the paired comparison, computed from items
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((report.parent / link).is_file() for link in links)
    assert all(not Path(link).is_absolute() for link in links)
    assert "Pipeline 2" not in text  # no bbq stages in this plan

    # the headline, first on the page: the largest paired change per measure, recomputed here from the items
    assert text.index("## What this run found") < text.index("## Stages") < text.index("### StereoSet")

    def stereotype_preferred(folder: Path) -> dict:
        rows = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
        by = {}
        for it in rows:
            by.setdefault(it["example_id"], {})[it["gold_label"]] = it["score"]
        return {e: s["stereotype"] > s["anti-stereotype"] for e, s in by.items()}

    from scipy.stats import binomtest
    runs = {label: stereotype_preferred(tmp_path / "outputs/stereoset" / label) for label in ("base", "debiased")}
    ids = sorted(runs["base"])
    before, after = (np.array([runs[k][e] for e in ids]) for k in ("base", "debiased"))
    delta = 100 * (after.mean() - before.mean())
    flips = int((before != after).sum())
    p = binomtest(int((before & ~after).sum()), flips, 0.5).pvalue if flips else 1.0
    row = next(line for line in text.splitlines() if line.startswith("| StereoSet SS, held-out (micro) |"))
    assert f"| {delta:+.2f} [" in row and f"| {p:.3g} | {flips} of {len(ids)} |" in row
    lms = {label: json.loads((tmp_path / "outputs/stereoset" / label / "metrics.json").read_text())["metrics"][
        "overall"]["all"]["lms"] for label in ("base", "debiased")}
    assert f"| {lms['base']:.2f} -> {lms['debiased']:.2f} [" in row and row.endswith("| not measured |")
    n_crows = len((tmp_path / "outputs/crows/rerun/items.jsonl").read_text().splitlines())
    assert f"**rerun (vs debiased) changed no held-out decision**: 0 of {len(ids)} StereoSet decisions flipped and " \
           f"0 of {n_crows} CrowS-Pairs decisions flipped" in text
    assert "debiased (vs base) changed no" not in text


def test_cli_rejects_a_bad_flag_value(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(pipeline.SCRIPTS / "run_pipeline.py"), "--nproc", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--nproc must be at least 1" in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_report_bbq_section_pairs_the_mitigation_stages(tmp_path, tokenizer, tiny_models, shared_data):
    from fairforget.evals.bbq import load_bbq, sample_per_category
    from fairforget.evals.bbq_eval import evaluate_bbq, write_bbq_run
    from fairforget.study.report import build_report
    from fairforget.tiny import build_tiny_model

    examples = sample_per_category(load_bbq(shared_data / "bbq", ["Age", "Religion"]).examples, 8, 0)
    out = tmp_path / "outputs"
    models = {"before": tiny_models["llama"], "pruned": build_tiny_model("llama", tokenizer, seed=3)}
    for name, model in models.items():
        metrics, items = evaluate_bbq(model, tokenizer, examples, "letter", "off", 8, 50, 0)
        write_bbq_run(out / "mitigation" / "m" / name, metrics, items, {"seed": 0})
    write_bbq_run(out / "bbq" / "m", metrics, items, {"seed": 0})
    # stage 22's controls and dose-response, as it writes them (numbers made up, so the rendering is checked)
    from fairforget.artifacts import write_json
    from fairforget.methods import head_controls as hc

    point = lambda v: {"s_amb": v, "s_amb_ci": [v - 0.1, v + 0.1], "acc_disambig": 0.5, "acc_disambig_ci": [0.4, 0.6],  # noqa: E731
                       "s_dis": 0.0, "s_dis_ci": [-0.1, 0.1]}
    rows = {"before": {"s_amb": 0.1, "s_amb_ci": [0.0, 0.2], "lms_overall": 80.0, "lms_overall_ci": [75.0, 85.0]},
            "pruned": {"s_amb": -0.1, "s_amb_ci": [-0.2, 0.0], "lms_overall": 70.0, "lms_overall_ci": [65.0, 75.0]},
            "recovered": {"s_amb": 0.4, "s_amb_ci": [0.3, 0.5], "lms_overall": 77.0, "lms_overall_ci": [72.0, 82.0]}}
    changes = {"pruned": {"d_s_amb": -0.2, "d_s_amb_ci": [-0.5, 0.1], "p_biased": 0.3, "d_ppl_pct": 40.0,
                          "d_ppl_pct_ci": [30.0, 50.0]},
               "recovered": {"d_s_amb": 0.3, "d_s_amb_ci": [0.1, 0.5], "p_biased": 0.01, "d_ppl_pct": 12.0,
                             "d_ppl_pct_ci": [5.0, 20.0]}}
    versus = {"bbq_s_amb": {"delta": -0.15, "ci": [-0.3, 0.0], "p": 0.04, "n_draws": 2}}
    controls = hc.controls_markdown({**rows, "random heads": [rows["before"], rows["pruned"]]},
                                    {**changes, "random heads": [changes["pruned"]]}, {"pruned": "3"}, versus)
    (out / "mitigation" / "m" / "controls.md").write_text(controls)
    nan = float("nan")
    undefined = {**point(0.0), "acc_disambig": nan, "acc_disambig_ci": [nan, nan]}  # no disambiguated item
    dose = [{"k": 0, "chosen": point(0.1), "random": []}, {"k": 1, "chosen": undefined, "random": [undefined]},
            {"k": 3, "chosen": point(-0.1), "random": [point(0.2), point(0.0)], "chosen_minus_random": {
                "bbq_s_amb": {"delta": -0.2, "ci": [-0.45, 0.05], "p": 0.12, "n_draws": 2},
                "bbq_acc_disambig": {"delta": 0.0, "ci": [-0.1, 0.1], "p": 1.0, "n_draws": 2}}}]
    hc.plot_dose_response(out / "mitigation" / "m" / "dose_response.png", dose, "test")
    write_json(out / "mitigation" / "m" / "metrics.json",  # as stage 22 writes it: NaN becomes null
               {"n_mitigation": 16, "n_held_out": len(examples), "heads_pruned": 3, "heads_by_strength": {"0.5": 3},
                "protected": [], "n_recovery_examples": 0, "rows": rows, "changes": changes, "dose_response": dose})
    stages = [Stage("20 BBQ before", "20_evaluate_bbq.py", {"out": out / "bbq" / "m"}, [], [out / "bbq" / "m"], "bbq"),
              Stage("22 heads", "22_mitigate_heads.py", {"out": out / "mitigation" / "m"}, [],
                    [out / "mitigation" / "m"], "bbq")]
    text = build_report(stages, [], out / "report.md", "test", 1.0, tmp_path / "no-data")
    overall = json.loads((out / "mitigation/m/pruned/metrics.json").read_text())["metrics"]["overall"]
    low, high = overall["s_amb_ci"]
    assert f"| pruned | {overall['n']} |" in text and f"{overall['s_amb']:+.3f} [{low:+.3f}, {high:+.3f}]" in text
    assert "| before -> pruned |" in text and "### BBQ, before (stage 20)" in text
    assert "Pipeline 1" not in text
    # the controls section: stage 22's controls.md as written, the dose-response table and figure
    controls_at = text.index("#### Controls: random heads, recovery only")
    assert text.index(controls, controls_at) > controls_at and "| random heads (2 draws) |" in text
    mean = (0.2 + 0.0) / 2  # the two random draws at k = 3
    assert f"| 3 | -0.100 [-0.200, +0.000] | {mean:+.3f} (2) | -0.200 [-0.450, +0.050] | 0.12 | 0.500 [0.400, 0.600] " \
           f"| 0.500 (2) | +0.000 [-0.100, +0.100] | 1 |" in text
    assert "| 0 | +0.100 [+0.000, +0.200] | n/a | n/a | n/a |" in text
    assert "| 1 | +0.000 [-0.100, +0.100] | +0.000 (1) | n/a | n/a | n/a | n/a | n/a | n/a |" in text
    assert "](mitigation/m/dose_response.png)" in text
    # the headline: the largest s_AMB change is the recovered model's, with its LMS and perplexity cost
    assert "| BBQ s_AMB | head pruning: recovered (vs before, stage 22) | +0.300 [+0.100, +0.500] (away from 0) | 0.01 | " \
           "n/a | 80.00 -> 77.00 [72.00, 82.00] | +12.0 [+5.0, +20.0]% |" in text
    assert "Significant (p < 0.05, interval excluding 0): head pruning: recovered" in text
    assert "within the capability bar (LMS at most 2 points lower, perplexity at most +5%): none." in text


def test_report_renders_stage_30_and_its_findings(tmp_path, monkeypatch, capsys):
    from fairforget.study.report import build_report

    monkeypatch.chdir(tmp_path)
    out = Path("outputs") / "methods" / "comparison"  # where the methods preset's stage 30 writes
    out.mkdir(parents=True)
    (out / "summary.md").write_text("# Debiasing methods side by side (before: `m`)\n\n## Levels\n\n| method | x |\n"
                                    "|---|---|\n| before | 1 |\n")
    (out / "bias_vs_capability.png").write_bytes(b"png")
    level = lambda lms: {"stereoset": {"all": {"lms": lms, "lms_ci": [lms - 3, lms + 3]}}}  # noqa: E731
    change = lambda d, p: {  # noqa: E731
        "ss_overall": {"delta_ss_micro": d, "delta_ss_micro_ci": [d - 1, d + 1], "p_value": p, "n": 100,
                       "true_before_only": 5, "true_after_only": 2, "ss_micro_before": 60.0, "ss_micro_after": 60.0 + d},
        "ss_gender_distance": {"delta": d / 2, "delta_ci": [d / 2 - 1, d / 2 + 1], "p_value": p, "n": 50,
                               "before": 8.0, "after": 8.0 + d / 2},
        "crows_all": {"delta": 0.0, "delta_ci": [-1.0, 1.0], "p_value": 1.0, "n": 40, "true_before_only": 0,
                      "true_after_only": 0, "metric_before": 55.0, "metric_after": 55.0},
        "bbq": {"s_amb_delta": 0.0, "s_amb_delta_ci": [-0.1, 0.1], "mcnemar_biased": {"p_value": 1.0}, "n": 88},
        "perplexity": {"ppl_change_pct": 3.0, "ppl_change_pct_ci": [1.0, 5.0]},
        "winobias": {"delta": d, "delta_ci": [d - 2, d + 2], "p_value": p, "n": 782, "true_before_only": 9,
                     "true_after_only": 1, "metric_before": 58.0, "metric_after": 58.0 + d}}
    (out / "metrics.json").write_text(json.dumps({"levels": {"before": level(80.0), "cda": level(79.5),
                                                             "tv": level(70.0)},
                                                  "changes": {"cda": change(-3.0, 0.001), "tv": change(-6.0, 0.2)}}))
    stage = Stage("30 compare methods", "30_compare_methods.py", {"before": "m", "out": out}, [], [out], "methods")
    text = build_report([stage], [], tmp_path / "outputs" / "report.md", "test", 1.0, tmp_path / "no-data")
    assert "## Debiasing methods side by side (m)" in text and "### Debiasing methods side by side (before: `m`)" in text
    assert "#### Levels" in text and "](methods/comparison/bias_vs_capability.png)" in text
    # largest SS change: tv (-6, p 0.2); the significant one, cda (-3, p 0.001), costs 0.5 LMS and +3% perplexity
    assert "| StereoSet SS, held-out (micro) | tv (vs before, stage 30) | -6.00 [-7.00, -5.00] (towards 50) | 0.2 | " \
           "7 of 100 | 80.00 -> 70.00 [67.00, 73.00] | +3.0 [+1.0, +5.0]% |" in text
    assert "| WinoBias (% pro-stereotypical preferred) | tv (vs before, stage 30) | -6.00 [-8.00, -4.00] (towards 50) " \
           "| 0.2 | 10 of 782 |" in text
    assert "within the capability bar (LMS at most 2 points lower, perplexity at most +5%): cda (vs before, stage " \
           "30) on StereoSet SS, held-out (micro); cda (vs before, stage 30) on StereoSet gender |SS - 50|; cda (vs " \
           "before, stage 30) on WinoBias (% pro-stereotypical preferred)." in text
    # the README's block: run_pipeline.py --findings-only prints the same block from the preset's outputs, runs nothing
    run_pipeline = load_script("run_pipeline.py")
    capsys.readouterr()
    run_pipeline.main(run_pipeline.Config(preset="methods", findings_only=True))
    block = capsys.readouterr().out
    assert block.startswith("## What this run found") and block in text and not (tmp_path / "data").exists()


@pytest.mark.parametrize("preset", ["quick", "full", "methods", "controls", "frontier", "controls-frontier"])
def test_no_checked_output_folder_of_a_stage_holds_another_kind_of_output(preset):
    """A stage's output folder (an ``output_field``, refused when it holds files that are not a result of its
    kind) never lies above another stage's output of another kind: the methods preset's stage 30 once wrote to
    outputs/methods, above every method's log folder. The data root is meant to hold the others."""
    plan = build_plan(preset)

    def checked(stage):  # (kind, folder) of each output folder flag the stage is given
        fields = dataclasses.fields(load_script(stage.script).Config)
        return [(f.metadata["writes"], Path(stage.args[f.name]).resolve()) for f in fields
                if "writes" in f.metadata and stage.args.get(f.name) is not None]

    for stage in plan:
        for kind, folder in checked(stage):
            if kind == "data":
                continue
            for other in plan:
                if other is stage:
                    continue
                kinds = {k for k, f in checked(other) if folder in f.parents}
                assert kinds <= {kind}, f"{stage.name} --out {folder} ({kind}) holds {other.name}'s {kinds}"


def test_frontier_plan_saves_settings_runs_the_seeded_methods_per_seed_and_compares_them_all(tmp_path):
    """The frontier preset: every method once (the ones that can save every setting do, into their own folder),
    each seeded method again per other seed into its own folders, and stage 30 given every chosen model, every
    replicate (name:seed<N>) and every frontier folder; no two stages write the same output."""
    from fairforget.methods.registry import METHODS

    layout = Layout(data=tmp_path / "data", outputs=tmp_path / "outputs", models=tmp_path / "models")
    chosen = json.loads((CONFIGS / "frontier.json").read_text())
    plan = build_plan("frontier", layout=layout)
    names = [s.name for s in plan]
    assert len(names) == len(set(names))
    seeded = [s for s in plan if " seed " in s.name]
    assert len(seeded) == len(chosen["seeded"]) * (len(chosen["seeds"]) - 1)
    assert {s.args["seed"] for s in seeded} == set(chosen["seeds"][1:])
    compare = next(s for s in plan if s.script == "30_compare_methods.py")
    methods = dict(m.split("=", 1) for m in compare.args["methods"])
    in_domain = {f"{n}+{source}" for source, names in chosen["pair_sources"].items() for n in names}
    assert set(methods) == set(METHODS) | {f"{n}:seed{k}" for n in chosen["seeded"] for k in chosen["seeds"][1:]} \
        | in_domain
    source_pairs = next(s for s in plan if s.name == "10 stereoset_selection pairs")
    assert source_pairs.args["sources"] == ["stereoset_selection"]
    for name in chosen["pair_sources"]["stereoset_selection"]:  # trained on the in-domain pairs, in their own folders
        stage = next(s for s in plan if s.name == f"{METHODS[name].script[:2]} {name} on stereoset_selection pairs")
        assert stage.args["pairs"] == source_pairs.outputs[0] and source_pairs.outputs[0] in stage.inputs
        assert methods[f"{name}+stereoset_selection"] == str(stage.args["out"])
    frontiers = dict(f.split("=", 1) for f in compare.args["frontiers"])
    assert set(frontiers) == {n for n, m in METHODS.items() if m.saves_settings} == {
        "cda", "bias_unlearn", "pcgu", "task_vector", "damage_reference", "sentence_debias", "inlp", "leace",
        "self_debias", "head_pruning"}
    for name, folder in frontiers.items():
        stage = next(s for s in plan if s.name == f"{METHODS[name].script[:2]} {name}")
        assert stage.args["settings_dir"] == Path(folder) and Path(folder) in stage.outputs
        assert Path(folder) in compare.inputs
    outputs = [o for s in plan for o in s.outputs]
    assert len(outputs) == len(set(outputs))
    assert compare.args["out"] == layout.outputs / "frontier" / "comparison"
