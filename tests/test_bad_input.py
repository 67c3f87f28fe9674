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
    ("12_pcgu_unlearn.py", ["--lr", "-1", "--pairs", "pairs.tsv"], "--lr must be positive", False),
    ("20_evaluate_bbq.py", ["--per-category", "0"], "--per-category must be at least 1", False),
    ("22_mitigate_heads.py", ["--k", "0"], "--k must be at least 1, got 0", False),
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
