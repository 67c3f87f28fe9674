"""Bad input gives one clear error (exit 2) and leaves earlier results as they were (docs/pipeline.md, "Bad input").

Cases: a missing file, a corrupt file, a wrong hash, an unknown model, a bad flag value, no disk space. The
stage scripts run as subprocesses on tiny inputs; the full disk is simulated in-process (a write that raises
ENOSPC).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script
from fairforget.artifacts import FOLDER_MARKER, atomic_dir, write_json
from fairforget.errors import FairforgetError

REPO = Path(__file__).resolve().parents[1]


def _stage(script: str, *args: str, cwd: Path, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run a stage as a user would (``subprocess_``), or in this process through the same ``run_script`` entry
    point (the same parsing, validation and error printing, without paying for a fresh interpreter)."""
    argv = [str(a) for a in args]
    if subprocess_:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.run([sys.executable, str(REPO / "scripts" / script), *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    import contextlib
    import io

    from fairforget.config import run_script

    module = load_script(script)
    err, code, previous = io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            run_script(module.main, module.Config(), argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(script, code, "", err.getvalue())


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An earlier run folder that a failing stage must not touch."""
    run = tmp_path / "earlier"
    write_json(run / "metrics.json", {"overall": "earlier result"})
    (run / "items.jsonl").write_text('{"id": 1}\n')
    return run


def _as_result_of(folder: Path, script: str) -> Path:
    """``folder`` marked as an earlier result of ``script``'s kind (a training stage writes a model, not a run)."""
    kind = {"11_finetune_lora.py": "adapter", "12_pcgu_unlearn.py": "model"}.get(script, "run")
    folder.mkdir(exist_ok=True)
    (folder / FOLDER_MARKER).write_text(json.dumps({"kind": kind}))
    return folder


def _fails_cleanly(done: subprocess.CompletedProcess, message: str, earlier: Path, before: dict) -> None:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(earlier) == before


@pytest.mark.parametrize("script, flags, message, as_subprocess", [
    ("13_evaluate_stereoset.py", ["--data", "absent/dev.json"], "StereoSet file not found: absent/dev.json", True),
    ("15_evaluate_crows.py", ["--data", "absent.csv"], "CrowS-Pairs file not found: absent.csv", False),
    ("20_evaluate_bbq.py", ["--data-dir", "absent", "--categories", "Age"],
     "BBQ metadata file not found: absent/supplemental/additional_metadata.csv", False),
    ("12_pcgu_unlearn.py", ["--pairs", "absent.tsv"], "--pairs absent.tsv not found", False),
    ("11_finetune_lora.py", ["--sentences", "absent.tsv"], "file not found: absent.tsv", False),
])
def test_missing_file(tmp_path, earlier, script, flags, message, as_subprocess):
    before = _snapshot(_as_result_of(earlier, script))
    done = _stage(script, *flags, "--out", earlier, "--device", "cpu", cwd=tmp_path, subprocess_=as_subprocess)
    _fails_cleanly(done, message, earlier, before)


def test_corrupt_files_are_named_with_their_line(tmp_path, earlier, shared_data):
    before = _snapshot(earlier)
    (tmp_path / "dev.json").write_text('{"version": "1.0", "data": {"intrasentence": [')  # truncated download
    done = _stage("13_evaluate_stereoset.py", "--data", "dev.json", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, "StereoSet file dev.json is malformed", earlier, before)

    rows = (shared_data / "crows_pairs/data/crows_pairs_anonymized.csv").read_text().splitlines()[:6]
    rows[4] = rows[4].replace(",stereo,", ",sterio,")
    (tmp_path / "crows.csv").write_text("\n".join(rows) + "\n")
    done = _stage("15_evaluate_crows.py", "--data", "crows.csv", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, "crows.csv:5: stereo_antistereo is 'sterio'", earlier, before)

    bbq = tmp_path / "bbq"
    shutil.copytree(shared_data / "bbq" / "supplemental", bbq / "supplemental")
    lines = (shared_data / "bbq/data/Age.jsonl").read_text().splitlines()[:20]
    lines[6] = lines[6][: len(lines[6]) // 2]  # a half-written line
    (bbq / "data").mkdir()
    (bbq / "data" / "Age.jsonl").write_text("\n".join(lines) + "\n")
    done = _stage("20_evaluate_bbq.py", "--data-dir", bbq, "--categories", "Age", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, "Age.jsonl:7: not valid JSON", earlier, before)


def test_wrong_hash_is_refused_and_verified_data_kept(tmp_path, shared_data):
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_data / "crows_pairs", mirror / "crows_pairs")
    first = _stage("00_fetch_data.py", "--datasets", "crows_pairs", "--source", mirror, "--out", "data", cwd=tmp_path,
                   subprocess_=True)
    assert first.returncode == 0, first.stderr
    before = _snapshot(tmp_path / "data")
    tampered = mirror / "crows_pairs/data/crows_pairs_anonymized.csv"
    tampered.write_text(tampered.read_text().replace("stereo", "STEREO", 1))
    done = _stage("00_fetch_data.py", "--datasets", "crows_pairs", "--source", mirror, "--out", "data", "--force",
                  cwd=tmp_path, subprocess_=True)
    _fails_cleanly(done, "failed verification", tmp_path / "data", before)
    assert "crows_pairs/data/crows_pairs_anonymized.csv" in done.stderr and "sha256" in done.stderr


@pytest.mark.parametrize("model, message, as_subprocess", [
    ("no-such-org/no-such-model", "cannot load model 'no-such-org/no-such-model'", True),
    ("models/absent/", "model folder not found: models/absent/", False),
    ("embedded:gpt-17", "unknown embedded model 'embedded:gpt-17'", False),
])
def test_unknown_model(tmp_path, earlier, shared_data, model, message, as_subprocess):
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--model", model, "--data", shared_data / "stereoset/dev.json",
                  "--limit", "10", "--out", earlier, "--device", "cpu", cwd=tmp_path, subprocess_=as_subprocess)
    _fails_cleanly(done, message, earlier, before)


@pytest.mark.parametrize("script, flags, message, as_subprocess", [
    ("13_evaluate_stereoset.py", ["--batch-size", "0"], "--batch-size must be at least 1, got 0", False),
    ("12_pcgu_unlearn.py", ["--lr", "-1", "--pairs", "pairs.tsv"], "--lr must be >= 0", False),
    ("20_evaluate_bbq.py", ["--per-category", "0"], "--per-category must be at least 1", False),
    ("22_mitigate_heads.py", ["--k", "0"], "--k must be at least 1, got 0", False),
    ("22_mitigate_heads.py", ["--evals", "stereoset"], "--evals must include bbq", False),
    ("12_pcgu_unlearn.py", ["--eval-only", ".", "--pairs", "pairs.tsv"], "--eval-only needs --heldout-eval", False),
    ("run_pipeline.py", ["--pipelines"], "--pipelines needs at least one", False),
])
def test_bad_flag_value(tmp_path, earlier, script, flags, message, as_subprocess):
    (tmp_path / "pairs.tsv").write_text("pair_id\n")
    before = _snapshot(earlier)
    done = _stage(script, *flags, cwd=tmp_path, subprocess_=as_subprocess)
    _fails_cleanly(done, message, earlier, before)


def test_flag_outside_its_choices_is_refused(tmp_path):
    done = _stage("13_evaluate_stereoset.py", "--device", "tpu", cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_disk_space_keeps_the_earlier_result_of_a_stage(tmp_path, shared_data, monkeypatch, capsys):
    stage = load_script("10_preprocess_winogender.py")
    from fairforget.config import run_script

    wino = shared_data / "winogender" / "data"
    argv = ["--winogender-dir", str(wino), "--out-dir", str(tmp_path / "processed")]
    run_script(stage.main, stage.Config(), argv)
    before = _snapshot(tmp_path / "processed")
    import csv

    monkeypatch.setattr(csv.DictWriter, "writerow", _disk_full)  # the disk fills while pairs.tsv is written
    with pytest.raises(SystemExit) as exit_info:
        run_script(stage.main, stage.Config(), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: no space left on the device while writing {tmp_path / 'processed' / 'pairs.tsv'}" in err
    assert "the earlier version was left as it was" in err
    assert _snapshot(tmp_path / "processed") == before  # no temporary file left either


def test_no_disk_space_while_saving_a_model_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder, "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"good")
    with pytest.raises(FairforgetError, match="no space left on the device while writing .*model; the earlier"):
        with atomic_dir(folder, "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            _disk_full()
    assert (folder / "weights.bin").read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---- issue 14: zero examples, unreadable weights, config types, modified data, column counts, model paths ----

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    from fairforget.tiny import save_tiny_model

    return save_tiny_model("gpt2", tokenizer, tmp_path_factory.mktemp("model") / "tiny-gpt2")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model) -> Path:
    """A peft LoRA adapter folder whose base is ``tiny_model``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    return folder


def test_zero_examples_fail_before_anything_is_written(tmp_path, earlier):
    before = _snapshot(earlier)
    (tmp_path / "empty.json").write_text(json.dumps({"version": "1", "data": {"intrasentence": [],
                                                                               "intersentence": []}}))
    done = _stage("13_evaluate_stereoset.py", "--data", "empty.json", "--out", earlier, "--device", "cpu",
                  cwd=tmp_path)
    _fails_cleanly(done, "no StereoSet examples to score: empty.json has none; nothing was written", earlier, before)
    done = _stage("13_evaluate_stereoset.py", "--limit", "0", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, "--limit must be at least 1", earlier, before)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_unreadable_weight_files_are_named(tmp_path, earlier, shared_data, tiny_model, tiny_adapter, kind, damage):
    folder = tmp_path / kind
    shutil.copytree(tiny_model if kind == "model" else tiny_adapter, folder)
    weights = folder / ("model.safetensors" if kind == "model" else "adapter_model.safetensors")
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"")
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--model", folder, "--data", shared_data / "stereoset/dev.json",
                  "--limit", "4", "--out", earlier, "--device", "cpu", cwd=tmp_path)
    _fails_cleanly(done, f"weight file {weights} cannot be read", earlier, before)


def test_model_paths_that_do_not_exist(tmp_path, earlier, shared_data, tiny_adapter):
    (tmp_path / "models").mkdir()
    before = _snapshot(earlier)
    common = ["--data", shared_data / "stereoset/dev.json", "--limit", "4", "--out", earlier, "--device", "cpu"]
    done = _stage("13_evaluate_stereoset.py", "--model", "models/does-not-exist", *common, cwd=tmp_path)
    _fails_cleanly(done, "model folder not found: models/does-not-exist", earlier, before)
    assert "hub" not in done.stderr.split("(")[0] and "hf download" not in done.stderr

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="models/gone")))
    done = _stage("13_evaluate_stereoset.py", "--model", adapter, *common, cwd=tmp_path)
    _fails_cleanly(done, f"the base model of adapter {adapter} ('models/gone', base_model_name_or_path in "
                         f"{adapter / 'adapter_config.json'}) cannot be loaded: model folder not found: models/gone",
                   earlier, before)


@pytest.mark.parametrize("script, content, message", [
    ("13_evaluate_stereoset.py", '{"limit": "twenty"}', "'limit' must be an integer or null, got \"twenty\""),
    ("13_evaluate_stereoset.py", '[{"limit": 20}]', "must hold a JSON object of settings"),
    ("13_evaluate_stereoset.py", '{"limit": true}', "'limit' must be an integer or null, got true"),
    ("13_evaluate_stereoset.py", '{"limit": 20.7}', "'limit' must be an integer or null, got 20.7"),
    ("13_evaluate_stereoset.py", '{"n_boot": "1000"}', "'n_boot' must be an integer, got \"1000\""),
    ("20_evaluate_bbq.py", '{"categories": "Age"}', "'categories' must be a list (each item one of"),
])
def test_config_file_values_are_checked_against_the_field_types(tmp_path, earlier, script, content, message):
    (tmp_path / "c.json").write_text(content)
    before = _snapshot(earlier)
    done = _stage(script, "--config", "c.json", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, f"config file c.json: {message}" if message.startswith("'") else message, earlier, before)


def _swap_gold_labels(text: str) -> str:
    """A well-formed StereoSet file that is not the pinned one: stereotype and anti-stereotype labels swapped."""
    return (text.replace('"gold_label": "stereotype"', '"gold_label": "@"')
            .replace('"gold_label": "anti-stereotype"', '"gold_label": "stereotype"')
            .replace('"gold_label": "@"', '"gold_label": "anti-stereotype"'))


def test_modified_data_is_refused_and_a_custom_copy_is_recorded(tmp_path, earlier, shared_data, tiny_model):
    tampered = _swap_gold_labels((shared_data / "stereoset/dev.json").read_text())
    (tmp_path / "data" / "stereoset").mkdir(parents=True)
    (tmp_path / "data" / "stereoset" / "dev.json").write_text(tampered)
    before = _snapshot(earlier)
    common = ["--model", tiny_model, "--limit", "8", "--n-boot", "20", "--device", "cpu"]
    done = _stage("13_evaluate_stereoset.py", "--data", "data/stereoset/dev.json", *common, "--out", earlier,
                  cwd=tmp_path)
    _fails_cleanly(done, "data file", earlier, before)
    assert (f"{tmp_path / 'data/stereoset/dev.json'} does not match the pinned manifest (sha256 mismatch"
            in done.stderr)
    assert "00_fetch_data.py --datasets stereoset --force" in done.stderr and "pass the copy with --data" in done.stderr

    (tmp_path / "custom.json").write_text(tampered)  # on purpose, outside data/: accepted, with its own sha256
    done = _stage("13_evaluate_stereoset.py", "--data", "custom.json", *common, "--out", "custom", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    provenance = json.loads((tmp_path / "custom" / "metrics.json").read_text())["provenance"]
    assert provenance["data_custom"] == ["custom.json"]
    assert provenance["data_sha256"]["custom.json"] == hashlib.sha256(tampered.encode()).hexdigest()


def test_rows_with_a_wrong_number_of_columns_are_refused(tmp_path, earlier, shared_data):
    from fairforget.winogender import PAIR_COLUMNS

    row = ["p1", "nurse", "t", "He is here.", "She is here.", "male", "90.0", "winogender"]
    lines = ["\t".join(PAIR_COLUMNS), "\t".join(row), "\t".join([*row[:-1], "winogender", "extra"])]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    model = _as_result_of(tmp_path / "model", "12_pcgu_unlearn.py")
    before = _snapshot(model)
    done = _stage("12_pcgu_unlearn.py", "--pairs", "pairs.tsv", "--out", model, "--device", "cpu", cwd=tmp_path)
    _fails_cleanly(done, "pairs.tsv:3: 9 columns, expected 8 as in the header", model, before)
    before = _snapshot(earlier)

    rows = (shared_data / "crows_pairs/data/crows_pairs_anonymized.csv").read_text().splitlines()[:5]
    rows[3] = rows[3] + ",surplus"
    (tmp_path / "crows.csv").write_text("\n".join(rows) + "\n")
    done = _stage("15_evaluate_crows.py", "--data", "crows.csv", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, "crows.csv:4: 9 columns, expected 8 as in the header", earlier, before)


# ---- issue 21: never delete what a stage did not write, never score a broken model, never read a half-parsed file

FOLDER_STAGES = [  # every stage writing a folder, with the flag naming it
    ("00_fetch_data.py", "--out"), ("10_preprocess_winogender.py", "--out-dir"), ("11_finetune_lora.py", "--out"),
    ("12_pcgu_unlearn.py", "--out"), ("12_pcgu_unlearn.py", "--log-dir"), ("13_evaluate_stereoset.py", "--out"),
    ("14_compare_prompts.py", "--out"), ("15_evaluate_crows.py", "--out"), ("17_evaluate_winobias.py", "--out"), ("20_evaluate_bbq.py", "--out"),
    ("21_localize_bias.py", "--out-root"), ("22_mitigate_heads.py", "--out"), ("30_compare_methods.py", "--out"),
    ("31_cda.py", "--out"), ("31_cda.py", "--log-dir"), ("32_task_vector.py", "--out"),
    ("32_task_vector.py", "--log-dir"), ("33_self_debias.py", "--out"), ("33_self_debias.py", "--log-dir"),
    ("34_bias_unlearn.py", "--out"), ("34_bias_unlearn.py", "--log-dir"), ("36_projection.py", "--out"), ("36_projection.py", "--log-dir"),
]


@pytest.mark.parametrize("script, flag", FOLDER_STAGES)
def test_no_stage_replaces_a_folder_of_other_files(tmp_path, script, flag):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("n\n")
    done = _stage(script, flag, foreign, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"error: {flag} {foreign} holds files that are not a fairforget" in done.stderr and "notes.txt" in done.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "n\n"


@pytest.mark.parametrize("out, message", [
    ("afile", "--out afile is a file; pass a folder"),
    ("afile/sub", "--out afile/sub is inside the file"),
    (".", "--out '.' names the current folder"),
    ("", "--out '.' names the current folder"),  # an empty path reads as "."
    (str(REPO / "src" / "fairforget"), "is the current folder, the fairforget checkout or its package"),
    (str(REPO), "is the current folder, the fairforget checkout or its package"),
    (str(REPO.parent), "is the current folder, the fairforget checkout or its package"),
])
def test_an_out_that_is_no_folder_of_its_own_is_refused(tmp_path, out, message):
    (tmp_path / "afile").write_text("keep\n")
    package = _snapshot(REPO / "src" / "fairforget")
    done = _stage("11_finetune_lora.py", "--out", out, "--limit", "4", cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert (tmp_path / "afile").read_text() == "keep\n" and _snapshot(REPO / "src" / "fairforget") == package


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:  # root writes through any mode: a read-only place it cannot write either
        target = Path("/sys/kernel/fairforget-out")
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys/kernel")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        target = tmp_path / "ro" / "out"
    done = _stage("13_evaluate_stereoset.py", "--out", target, "--data", "absent.json", cwd=tmp_path)
    assert done.returncode == 2 and f"error: --out {target} cannot be written" in done.stderr, done.stderr


def test_a_symlinked_out_is_written_through_and_no_temporary_is_left(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    with atomic_dir(real, "model") as tmp:
        (tmp / "weights").write_text("old")
    link.symlink_to(real, target_is_directory=True)
    with atomic_dir(link, "model") as tmp:
        (tmp / "weights").write_text("new")
    assert link.is_symlink() and (real / "weights").read_text() == "new" and (link / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_training_stops_at_the_first_non_finite_step_keeping_the_last_state(tmp_path, tokenizer):
    from fairforget.checkpoint import Checkpointer, latest_checkpoint
    from fairforget.methods.lora import add_lora, finetune
    from fairforget.tiny import build_tiny_model

    texts = ["The nurse said she was tired.", "The doctor said he was late.", "A cat sat.", "It rained."]
    model = add_lora(build_tiny_model("llama", tokenizer, seed=0), ["q_proj", "v_proj"], r=2)  # not the shared one
    with pytest.raises(FairforgetError, match=r"training stopped at epoch 1, step 1: the update made .*lora.* "
                                              r"non-finite \(lower --lr\); nothing was saved"):
        finetune(model, tokenizer, texts, epochs=1, batch_size=4, lr=float("inf"))  # one step: the last one
    model = add_lora(build_tiny_model("llama", tokenizer, seed=0), ["q_proj", "v_proj"], r=2)
    calls = []  # the second forward pass (step 2) overflows: its loss is NaN
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out * float("nan") if calls.append(1) or len(calls) == 2 else out)
    saved = Checkpointer(tmp_path / "resume", every=1)
    with pytest.raises(FairforgetError, match=r"training stopped at epoch 1, step 2: the loss is nan \(lower --lr\); "
                                              r"the last saved state in .*resume is kept"):
        finetune(model, tokenizer, texts, epochs=1, batch_size=2, lr=1e-3, checkpoint=saved)
    assert latest_checkpoint(tmp_path / "resume").name == "step-00000001"


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_a_model_with_non_finite_weights_is_not_scored(tmp_path, earlier, shared_data, tiny_model, tiny_adapter, kind):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    shutil.copytree(tiny_model if kind == "model" else tiny_adapter, folder)
    weights = folder / ("model.safetensors" if kind == "model" else "adapter_model.safetensors")
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if ("lora_B" if kind == "adapter" else "c_attn.weight") in n)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--model", folder, "--data", shared_data / "stereoset/dev.json",
                  "--limit", "4", "--out", earlier, "--device", "cpu", cwd=tmp_path)
    _fails_cleanly(done, "has non-finite weights: ", earlier, before)
    assert name.split(".")[-2] in done.stderr and "holds 1 NaN or infinite value(s) of" in done.stderr


def test_a_scorer_meeting_a_non_finite_score_stops_naming_the_item(tiny_models, tokenizer):
    import torch

    from fairforget.scoring import score_continuations

    model = tiny_models["gpt2"]
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        saved = weight.clone()
        weight.fill_(3e38)  # finite weights whose logits overflow
    try:
        with pytest.raises(FairforgetError, match=r"request 1 \('The nurse.'\) got a non-finite log-probability"):
            score_continuations(model, tokenizer, [("", "The nurse."), ("", "A cat.")])
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_a_request_past_the_models_positions_is_refused_naming_it(tiny_models, tokenizer):
    from fairforget.evals.stereoset import score_examples, Example

    long = "word " * 600  # the tiny models have 512 positions
    examples = [Example("ex1", "intrasentence", "gender", "t", "BLANK", {
        "stereotype": ("s1", "Short one."), "anti-stereotype": ("s2", long), "unrelated": ("s3", "Fine.")})]
    with pytest.raises(FairforgetError, match=r"StereoSet intrasentence example ex1 \(anti-stereotype\) is 60[0-9] "
                                              r"tokens long, more than the model's 512 positions"):
        score_examples(tiny_models["llama"], tokenizer, examples)


def test_tampered_pinned_data_with_size_and_mtime_restored_is_refused(tmp_path, earlier, shared_data, tiny_model,
                                                                       monkeypatch):
    from fairforget import datasets

    fetch = _stage("00_fetch_data.py", "--source", shared_data, "--datasets", "stereoset", "--out", "data",
                   cwd=tmp_path)
    assert fetch.returncode == 0, fetch.stderr
    dev = tmp_path / "data/stereoset/dev.json"
    stat = dev.stat()
    dev.write_text(_swap_gold_labels(dev.read_text()))  # the same size
    os.utime(dev, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the mtime the manifest recorded
    assert dev.stat().st_size == stat.st_size
    monkeypatch.setattr(datasets, "_verified", set())  # a fresh process
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--data", "data/stereoset/dev.json", "--model", tiny_model,
                  "--limit", "4", "--n-boot", "20", "--out", earlier, "--device", "cpu", cwd=tmp_path)
    _fails_cleanly(done, f"data file {dev.absolute()} does not match the pinned manifest (sha256 mismatch", earlier,
                   before)


def test_a_stray_quote_in_a_tsv_is_a_character_not_a_field_over_many_lines(tmp_path, shared_data):
    from fairforget.winogender import load_winogender_pairs

    source = shared_data / "winogender/data"
    expected = len(load_winogender_pairs(source / "all_sentences.tsv", source / "occupations-stats.tsv"))
    lines = (source / "all_sentences.tsv").read_text().splitlines(keepends=True)
    sentid, sentence = lines[5].split("\t")
    lines[5] = f'{sentid}\t"{sentence}'
    (tmp_path / "all_sentences.tsv").write_text("".join(lines))  # a custom copy: not pinned
    pairs = load_winogender_pairs(tmp_path / "all_sentences.tsv", source / "occupations-stats.tsv")
    assert expected == 240 and len(pairs) == expected


STEREOSET_OK = {"id": "a1", "target": "nurse", "bias_type": "gender", "context": "The nurse was BLANK.",
                "sentences": [{"id": "s1", "sentence": "The nurse was caring.", "gold_label": "stereotype"},
                              {"id": "s2", "sentence": "The nurse was rude.", "gold_label": "anti-stereotype"},
                              {"id": "s3", "sentence": "The nurse was table.", "gold_label": "unrelated"}]}


def _stereoset_with(**change) -> dict:
    example = json.loads(json.dumps(STEREOSET_OK))
    example.update(change)
    return example


@pytest.mark.parametrize("examples, message", [
    ([_stereoset_with(context=None)], "intrasentence[0]: 'context' must be a string, got null"),
    ([STEREOSET_OK, STEREOSET_OK], "intrasentence[1]: duplicate example id 'a1'"),
    ([_stereoset_with(sentences=STEREOSET_OK["sentences"][:2] + [dict(STEREOSET_OK["sentences"][2],
                                                                      gold_label="stereotype")])],
     "intrasentence[0]: gold labels ['stereotype', 'anti-stereotype', 'stereotype'], expected exactly one each"),
    ([_stereoset_with(bias_type="age")], "intrasentence[0]: unknown bias_type 'age' (known: gender, profession"),
    ([_stereoset_with(id=7)], "intrasentence[0]: 'id' must be a string, got int 7"),
    ([_stereoset_with(sentences=[dict(STEREOSET_OK["sentences"][0], sentence=None), *STEREOSET_OK["sentences"][1:]])],
     "intrasentence[0]: sentences[0]: 'sentence' must be a string, got null"),
    ([_stereoset_with(sentences=["The nurse was caring.", "x", "y"])], "intrasentence[0]: sentences[0]: not an object"),
])
def test_malformed_stereoset_examples_are_refused_one_line_each(tmp_path, examples, message):
    from fairforget.evals.stereoset import load_stereoset

    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "1", "data": {"intrasentence": examples, "intersentence": []}}))
    with pytest.raises(FairforgetError) as err:
        load_stereoset(path)
    assert f"StereoSet file {path} has " in str(err.value) and f" problem(s) in its examples:\n  {message}" in str(err.value)
    assert "string indices" not in str(err.value)


def test_every_problem_of_a_stereoset_file_gets_its_own_line(tmp_path):
    from fairforget.evals.stereoset import load_stereoset

    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "1", "data": {"intrasentence": [_stereoset_with(context=None, id=3)],
                                                         "intersentence": [_stereoset_with(bias_type="x")]}}))
    with pytest.raises(FairforgetError) as err:
        load_stereoset(path)
    assert str(err.value).splitlines()[1:] == [
        "  intrasentence[0]: 'id' must be a string, got int 3",
        "  intrasentence[0]: 'context' must be a string, got null",
        "  intersentence[0]: unknown bias_type 'x' (known: gender, profession, race, religion)"]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--n-boot", "2"], "--n-boot must be at least 10"),
    (["--lora-dropout", "1.5"], "--lora-dropout is a probability of dropping a unit: it must be in [0, 1), got 1.5"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--max-ppl-increase", "-5"], "--max-ppl-increase must be at least 0, got -5.0"),
    (["--selection-ppl-texts", "0"], "--selection-ppl-texts is a sample size: it must be at least 1, got 0"),
])
def test_bad_typed_flag_values_give_one_line(tmp_path, flags, message):
    script = {"--n-boot": "13_evaluate_stereoset.py", "--max-ppl-increase": "32_task_vector.py",
              "--selection-ppl-texts": "36_projection.py"}.get(flags[0], "11_finetune_lora.py")
    done = _stage(script, *flags, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == f"error: {message}\n" or message in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_disk_full_and_file_size_limit_while_saving_a_model_give_one_line(tmp_path):
    from safetensors import SafetensorError

    folder = tmp_path / "model"
    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')
    for error, message in [(full, "no space left on the device while writing"),
                           (OSError(errno.EFBIG, os.strerror(errno.EFBIG)), "a file grew past the size limit")]:
        with pytest.raises(FairforgetError, match=message):
            with atomic_dir(folder, "model") as tmp:
                (tmp / "weights.bin").write_bytes(b"half")
                raise error
    assert list(tmp_path.iterdir()) == []


def test_a_real_file_size_limit_gives_one_line(tmp_path):
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # ulimit -f\n"
              "from fairforget.artifacts import write_text\n"
              "from fairforget.errors import FairforgetError\n"
              "try:\n    write_text(sys.argv[1], 'x' * 5000)\nexcept FairforgetError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.txt")], capture_output=True, text=True,
                          timeout=60)
    assert "a file grew past the size limit of this process (ulimit -f)" in done.stdout, done.stderr
    assert list(tmp_path.iterdir()) == []


def _stage_13_on_an_edited_adapter(tmp_path, earlier, shared_data, tiny_adapter, **changes):
    """A copy of the tiny adapter with ``changes`` in its adapter_config.json, scored by stage 13 into ``earlier``;
    returns the adapter folder, the snapshot of ``earlier`` before and the finished process."""
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, **{
        k: (str(adapter) if v is _SELF else v) for k, v in changes.items()})))
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--model", adapter, "--data", shared_data / "stereoset/dev.json",
                  "--limit", "4", "--out", earlier, cwd=tmp_path)
    return adapter, before, done


_SELF = object()  # stands for the edited adapter's own folder in _stage_13_on_an_edited_adapter


def test_an_adapter_whose_base_is_itself_is_refused(tmp_path, earlier, shared_data, tiny_adapter):
    adapter, before, done = _stage_13_on_an_edited_adapter(tmp_path, earlier, shared_data, tiny_adapter,
                                                           base_model_name_or_path=_SELF)
    _fails_cleanly(done, f"adapter {adapter} names {str(adapter)!r} as its base model", earlier, before)


def test_an_adapter_config_with_a_wrong_type_is_one_line(tmp_path, earlier, shared_data, tiny_adapter):
    adapter, before, done = _stage_13_on_an_edited_adapter(tmp_path, earlier, shared_data, tiny_adapter, r="eight")
    _fails_cleanly(done, f"cannot load the peft adapter in {adapter}", earlier, before)


def test_pickle_weights_are_refused_without_suggesting_to_unpickle(tmp_path, earlier, shared_data, tokenizer):
    import torch

    from fairforget.tiny import build_tiny_model

    folder = tmp_path / "pickled"
    model = build_tiny_model("gpt2", tokenizer)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the old pickle format
    before = _snapshot(earlier)
    done = _stage("13_evaluate_stereoset.py", "--model", folder, "--data", shared_data / "stereoset/dev.json",
                  "--limit", "4", "--out", earlier, cwd=tmp_path)
    _fails_cleanly(done, f"model folder {folder} holds only pickle weights (pytorch_model.bin)", earlier, before)
    assert "weights_only" not in done.stderr


def test_compare_to_refuses_a_same_size_edit_of_its_items(tmp_path):
    from fairforget.run_folders import run_folder

    run = tmp_path / "run"
    with run_folder(run) as tmp:
        write_json(tmp / "metrics.json", {"m": 1})
        (tmp / "items.jsonl").write_text('{"id": 1, "score": 0.25}\n')
    (run / "items.jsonl").write_text('{"id": 1, "score": 0.75}\n')  # the same size
    done = _stage("13_evaluate_stereoset.py", "--compare-to", run, cwd=tmp_path)
    assert done.returncode == 2 and (f"--compare-to {run} is not the run its run_complete.json describes: "
                                     f"items.jsonl is missing or was changed") in done.stderr, done.stderr


def test_the_provenance_command_is_shell_quoted(monkeypatch):
    import shlex

    from fairforget.provenance import provenance

    argv = ["scripts/13_evaluate_stereoset.py", "--out", "outputs/my run", "--model", "it's"]
    monkeypatch.setattr(sys, "argv", argv)
    assert shlex.split(provenance()["command"]) == argv


def test_model_weight_files_get_the_mode_of_other_files(tmp_path, tokenizer):
    from fairforget.artifacts import save_model
    from fairforget.tiny import build_tiny_model

    save_model(build_tiny_model("gpt2", tokenizer), tokenizer, tmp_path / "model")
    (tmp_path / "plain.txt").write_text("x")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {plain}, modes
