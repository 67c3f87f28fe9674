"""Whole run folders: a stage killed at any artifact write leaves the earlier run intact or the new one complete.

The fault-injection hook (``FAIRFORGET_FAULT_AFTER_WRITES=N`` in ``fairforget.artifacts``) stops a stage right
after its N-th artifact write (each file, and the final swap of the folder): in-process by raising (every
write of stages 13 and 15), and as a real SIGKILL of a subprocess (stage 13 at its first write, its last file
and its swap). Readers (report, pipeline, ``--compare-to``) refuse a folder without a complete marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script
from fairforget import artifacts
from fairforget.artifacts import FAULT_ENV, FAULT_MODE_ENV, InjectedFault, write_json
from fairforget.run_folders import RUN_MARKER, require_complete_run, run_folder, run_problem
from fairforget.errors import FairforgetError

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    from fairforget.tiny import save_tiny_model

    return save_tiny_model("gpt2", tokenizer, tmp_path_factory.mktemp("model") / "tiny-gpt2")


def _configs(script: str, model: Path, shared_data: Path, out: Path, limit: int):
    stage = load_script(script)
    data = (shared_data / "stereoset" / "dev.json" if script.startswith("13") else
            shared_data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv")
    return stage, stage.Config(model=str(model), data=data, limit=limit, n_boot=20, device="cpu", out=out)


def _count_writes(stage, cfg, monkeypatch) -> int:
    """How many artifact writes (files and the folder swap) one run of the stage makes."""
    monkeypatch.setenv(FAULT_ENV, str(10 ** 9))
    artifacts.reset_write_count()
    stage.main(cfg)
    monkeypatch.delenv(FAULT_ENV)
    return artifacts._write_count


@pytest.mark.parametrize("script", ["13_evaluate_stereoset.py", "15_evaluate_crows.py"])
def test_a_stage_stopped_at_each_write_leaves_the_earlier_run_or_the_complete_new_one(
        script, tmp_path, tiny_model, shared_data, monkeypatch):
    out = tmp_path / "run"
    stage, earlier_cfg = _configs(script, tiny_model, shared_data, out, limit=20)
    stage.main(earlier_cfg)
    earlier = _snapshot(out)
    earlier_n = len((out / "items.jsonl").read_text().splitlines())
    _, new_cfg = _configs(script, tiny_model, shared_data, out, limit=12)
    writes = _count_writes(stage, dataclasses.replace(new_cfg, out=tmp_path / "count"), monkeypatch)
    assert writes >= 5  # items, csv, metrics.json, a plot, the marker ... and the swap
    monkeypatch.setenv(FAULT_MODE_ENV, "raise")
    for n in range(1, writes + 1):
        monkeypatch.setenv(FAULT_ENV, str(n))
        artifacts.reset_write_count()
        with pytest.raises(InjectedFault) as fault:
            stage.main(new_cfg)
        lines = len((out / "items.jsonl").read_text().splitlines())
        if n < writes:  # stopped before the swap: the earlier run, byte for byte
            assert _snapshot(out) == earlier, f"write {n}"
            state = f"earlier run intact ({lines} item lines)"
        else:  # stopped right after the swap: the new run, complete
            assert run_problem(out) is None and lines != earlier_n
            assert json.loads((out / RUN_MARKER).read_text())["files"].keys() == {
                p for p in _snapshot(out) if p != RUN_MARKER}
            state = f"new run complete ({lines} item lines)"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["count", "run"]  # no temporary left
        print(f"{script} stopped after write {n}/{writes} ({fault.value}): {state}")


def test_sigkill_at_a_write_leaves_the_earlier_run_or_the_complete_new_one(tmp_path, tiny_model, shared_data,
                                                                            monkeypatch):
    out = tmp_path / "run"
    stage, earlier_cfg = _configs("13_evaluate_stereoset.py", tiny_model, shared_data, out, limit=20)
    stage.main(earlier_cfg)
    earlier = _snapshot(out)
    _, new_cfg = _configs("13_evaluate_stereoset.py", tiny_model, shared_data, tmp_path / "count", limit=12)
    writes = _count_writes(stage, new_cfg, monkeypatch)
    command = [sys.executable, str(REPO / "scripts" / "13_evaluate_stereoset.py"), "--model", str(tiny_model),
               "--data", str(shared_data / "stereoset" / "dev.json"), "--limit", "12", "--n-boot", "20",
               "--device", "cpu", "--out", str(out)]
    for n in (1, writes - 1, writes):  # the first file, the completion marker, the swap
        env = dict(os.environ, **{FAULT_ENV: str(n)}, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == -9, done.stderr  # SIGKILL: no handler ran
        if n < writes:
            assert _snapshot(out) == earlier
        else:
            assert run_problem(out) is None and _snapshot(out) != earlier
        print(f"stage 13 SIGKILLed after write {n}/{writes}: "
              f"{'earlier run intact' if n < writes else 'new run complete'}; left beside it: "
              f"{sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.'))}")
    stage.main(earlier_cfg)  # the next run clears what the killed ones left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count", "run"] and run_problem(out) is None


def test_readers_refuse_an_incomplete_run_folder(tmp_path, tiny_model, shared_data):
    from fairforget.hashing import Hasher
    from fairforget.study.pipeline import Stage, why_not_done, write_record
    from fairforget.study.report import build_report

    out = tmp_path / "run"
    stage, cfg = _configs("13_evaluate_stereoset.py", tiny_model, shared_data, out, limit=12)
    stage.main(cfg)
    plan = [Stage("13 StereoSet base", "13_evaluate_stereoset.py", {"out": out}, [], [out], "pcgu")]
    write_record(plan[0], Hasher(), 1.0)
    assert why_not_done(plan[0], Hasher()) is None
    report = build_report(plan, [], tmp_path / "report.md", "t", 0.0)
    assert "| base | " in report
    (out / RUN_MARKER).unlink()  # as a run killed before its marker, or one of the old mixed folders
    assert "incomplete" in why_not_done(plan[0], Hasher())
    report = build_report(plan, [], tmp_path / "report.md", "t", 0.0)
    assert "is incomplete: it has no run_complete.json" in report and "| base | " not in report
    with pytest.raises(FairforgetError, match=f"--compare-to {out} is incomplete"):
        stage.Config(compare_to=out).validate()
    with pytest.raises(FairforgetError, match="not found"):
        require_complete_run(tmp_path / "absent", "--compare-to")


def test_a_changed_file_makes_the_run_incomplete_and_foreign_folders_are_not_replaced(tmp_path):
    with run_folder(tmp_path / "run") as tmp:
        write_json(tmp / "metrics.json", {"n": 1})
    assert run_problem(tmp_path / "run") is None
    write_json(tmp_path / "run" / "metrics.json", {"n": 22})  # one file of another run copied in
    assert "metrics.json is missing or was changed" in run_problem(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(FairforgetError, match="not a fairforget run"):
        with run_folder(tmp_path / "mine"):
            pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_nan_is_written_as_null_with_a_note(tmp_path):
    import numpy as np

    write_json(tmp_path / "m.json", {"ss": float("nan"), "ci": [np.float32("nan"), 1.5], "provenance": {}})

    def strict(word):
        raise ValueError(f"bare {word} in JSON")

    data = json.loads((tmp_path / "m.json").read_text(), parse_constant=strict)
    assert data["ss"] is None and data["ci"] == [None, 1.5]
    assert data["provenance"]["null_values"].startswith("2 value(s) written as null")


def test_tiny_groups_warn_that_their_interval_is_unreliable(tmp_path, tiny_model, shared_data, capsys):
    stage, cfg = _configs("13_evaluate_stereoset.py", tiny_model, shared_data, tmp_path / "run", limit=12)
    stage.main(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    small = {f"{s}/{d}": m["n"] for s, ds in written["metrics"].items() for d, m in ds.items()
             if m["n"] < artifacts.SMALL_N}
    assert small  # 12 examples over 2 splits x 4 domains
    [warning] = written["provenance"]["warnings"]
    assert f"{len(small)} group(s) with fewer than {artifacts.SMALL_N} items" in warning
    assert all(f"{k} (n={n})" in warning for k, n in small.items())
    assert f"warning: {warning}" in capsys.readouterr().err
