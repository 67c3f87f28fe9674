"""Killed training resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairforget.checkpoint import KILL_ENV, Checkpointer, latest_checkpoint, load_training_state, save_training_state
from fairforget.errors import FairforgetError
from fairforget.run_folders import beside

REPO = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class DyingCheckpointer(Checkpointer):
    def __init__(self, *args, die_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_at = die_at

    def save(self, step, extra=None):
        super().save(step, extra)
        if step == self.die_at:
            raise Interrupted


def _toy_run(folder: Path | None, die_at: int | None = None, every: int = 3, fingerprint="toy") -> tuple:
    """A small loop with dropout, AdamW and NumPy noise: everything a resume has to restore."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    cls = DyingCheckpointer if die_at else Checkpointer
    ckpt = cls(folder, every, fingerprint, **({"die_at": die_at} if die_at else {}))
    losses = ckpt.resume(model.named_parameters(), optimizer).get("losses", [])
    step = 0
    for epoch in range(3):
        order = np.random.RandomState(epoch).permutation(32)
        for start in range(0, 32, 8):
            step += 1
            if ckpt.done(step):
                continue
            x = data[order[start: start + 8]] + float(np.random.normal())  # global NumPy stream
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            ckpt.after_step(step, lambda: {"losses": losses})
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses


def test_toy_loop_resumes_to_the_uninterrupted_result(tmp_path):
    reference, ref_losses = _toy_run(None)
    with pytest.raises(Interrupted):
        _toy_run(tmp_path / "ckpt", die_at=6)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000006"
    torch.manual_seed(123)  # the resumed process starts with other RNG states
    np.random.seed(123)
    resumed, losses = _toy_run(tmp_path / "ckpt")
    assert losses == ref_losses
    assert torch.equal(resumed, reference)
    # only the newest state is kept
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000012"]


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys):
    with pytest.raises(Interrupted):
        _toy_run(tmp_path / "ckpt", die_at=3, fingerprint="lr=0.05")
    fresh, _ = _toy_run(None)
    other, _ = _toy_run(tmp_path / "ckpt", fingerprint="lr=0.01")
    assert "other settings" in capsys.readouterr().out
    assert torch.equal(other, fresh)


def test_half_written_and_corrupt_states(tmp_path):
    params = {"w": torch.ones(3)}
    save_training_state(tmp_path, 2, params)
    (tmp_path / ".step-00000004.abc.tmp").mkdir()  # an atomic write that was killed: never picked
    (tmp_path / "step-00000005").mkdir()  # no state file: never picked
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    (tmp_path / "step-00000002" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(FairforgetError, match="cannot be read"):
        load_training_state(tmp_path / "step-00000002", params)


def test_recovery_finetuning_resumes(tmp_path, tokenizer, tiny_models):
    import copy

    from fairforget.methods.recovery import finetune_answers, prepare_model

    prompts = [f"Context {i}. Question? A. x B. y C. z Answer:" for i in range(10)]
    gold = [i % 3 for i in range(10)]

    def run(ckpt):
        model = prepare_model(copy.deepcopy(tiny_models["llama"]), "lora", seed=0)
        history = finetune_answers(model, tokenizer, prompts, gold, epochs=2, batch_size=4, lr=1e-2, seed=0,
                                   checkpoint=ckpt)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, history

    reference, ref_history = run(None)
    with pytest.raises(Interrupted):
        run(DyingCheckpointer(tmp_path / "ck", 2, "recovery", die_at=4))
    resumed, history = run(Checkpointer(tmp_path / "ck", 2, "recovery"))
    assert [h.loss for h in history] == [h.loss for h in ref_history]
    assert all(torch.allclose(resumed[n], reference[n], atol=1e-6, rtol=0) for n in reference)


# ---- the stage scripts, killed for real -------------------------------------------------------------------------


def _killed(args: list[str], cwd: Path, kill_at: int) -> subprocess.CompletedProcess:
    """The stage as a subprocess that SIGKILLs itself right after writing the checkpoint of step ``kill_at``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{KILL_ENV: str(kill_at)})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _in_process(args: list[str], cwd: Path, capsys) -> str:
    """The same stage command run through its ``run_script`` entry point in this process; returns its stdout."""
    from conftest import load_script
    from fairforget.config import run_script

    module = load_script(Path(args[0]).name)
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        capsys.readouterr()
        run_script(module.main, module.Config(), args[1:])
    finally:
        os.chdir(previous)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    from fairforget.tiny import save_tiny_model

    return save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-6, worst


def test_lora_stage_killed_by_sigkill_resumes_to_the_same_adapter(tmp_path, tiny_folder, shared_data, capsys):
    script = str(REPO / "scripts" / "11_finetune_lora.py")
    args = [script, "--model", str(tiny_folder), "--sentences",
            str(shared_data / "winogender" / "data" / "all_sentences.tsv"), "--limit", "24", "--epochs", "2",
            "--batch-size", "4", "--checkpoint-every", "3", "--device", "cpu"]
    _in_process(args + ["--out", "a/adapter"], tmp_path, capsys)

    killed = _killed(args + ["--out", "b/adapter"], tmp_path, kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "b" / "adapter").exists()  # nothing final was written
    assert latest_checkpoint(tmp_path / "b" / "adapter_resume").name == "step-00000006"

    resumed = _in_process(args + ["--out", "b/adapter"], tmp_path, capsys)
    assert "resuming from" in resumed and "(step 6)" in resumed
    _assert_same_weights(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter")
    assert (tmp_path / "a/adapter_log/loss.csv").read_text() == (tmp_path / "b/adapter_log/loss.csv").read_text()
    assert not (tmp_path / "b" / "adapter_resume").exists()  # cleared once the adapter is written


def test_pcgu_stage_killed_mid_epoch_resumes_to_the_same_model(tmp_path, tiny_folder, shared_data, capsys):
    from fairforget.winogender import load_winogender_pairs, write_pairs_tsv

    wino = shared_data / "winogender" / "data"
    pairs = load_winogender_pairs(wino / "all_sentences.tsv", wino / "occupations-stats.tsv", "bergsma")
    write_pairs_tsv(tmp_path / "pairs.tsv", pairs[:24])
    script = str(REPO / "scripts" / "12_pcgu_unlearn.py")
    args = [script, "--model", str(tiny_folder), "--pairs", "pairs.tsv", "--stereoset",
            str(shared_data / "stereoset" / "dev.json"), "--epochs", "2", "--batch-size", "4", "--k", "500",
            "--lr", "1e-3", "--selection-limit", "12", "--n-boot", "10", "--checkpoint-every", "4",
            "--device", "cpu"]
    _in_process(args + ["--out", "a/debiased", "--log-dir", "a/log"], tmp_path, capsys)

    # 6 steps per epoch: step 8 is in the middle of epoch 2
    killed = _killed(args + ["--out", "b/debiased", "--log-dir", "b/log"], tmp_path, kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "b" / "debiased").exists()
    resumed = _in_process(args + ["--out", "b/debiased", "--log-dir", "b/log"], tmp_path, capsys)
    assert "(step 8)" in resumed
    _assert_same_weights(tmp_path / "a" / "debiased", tmp_path / "b" / "debiased")
    for part in ("resume", "best"):  # the side folders of the one stage layout are cleared at the end
        assert not beside(tmp_path / "b" / "debiased", part).exists()
    for name, timing in (("unlearning_log.csv", "seconds"), ("epochs.csv", "train_seconds")):
        assert _rows_without(tmp_path / "a/log" / name, timing) == _rows_without(tmp_path / "b/log" / name, timing)


def _rows_without(path: Path, column: str) -> list[dict]:
    import csv

    with open(path) as handle:
        return [{k: v for k, v in row.items() if k != column} for row in csv.DictReader(handle)]


def test_head_mitigation_stage_killed_during_recovery_resumes_to_the_same_model(tmp_path, tiny_folder, shared_data,
                                                                                  capsys):
    script = str(REPO / "scripts" / "22_mitigate_heads.py")
    args = [script, "--model", str(tiny_folder), "--data-dir", str(shared_data / "bbq"), "--categories", "Age",
            "Religion", "--mitigation-per-category", "8", "--eval-per-category", "4", "--recovery-epochs", "2",
            "--recovery-batch-size", "2", "--localize-per-category", "1", "--n-boot", "10", "--checkpoint-every",
            "2", "--device", "cpu", "--signal", "bbq", "--evals", "bbq", "--k", "2", "--dose-ks", "1",
            "--random-draws", "1", "--dose-random-draws", "1"]
    run = lambda where: ["--models-dir", f"{where}/models", "--out", f"{where}/out",  # noqa: E731
                         "--localization-root", f"{where}/loc"]
    _in_process(args + run("a"), tmp_path, capsys)

    # 16 recovery steps (16 mitigation examples of both conditions, batch 2, 2 epochs): step 6 is inside epoch 1
    killed = _killed(args + run("b"), tmp_path, kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    recovered = tmp_path / "b" / "models" / "recovered"
    assert not (recovered / "tiny-llama").exists() and not (tmp_path / "b" / "out" / "metrics.json").exists()
    assert latest_checkpoint(recovered / "tiny-llama_resume").name == "step-00000006"

    resumed = _in_process(args + run("b"), tmp_path, capsys)
    assert "(step 6)" in resumed
    _assert_same_weights(tmp_path / "a" / "models" / "recovered" / "tiny-llama", recovered / "tiny-llama")
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert (a / "recovery_log.csv").read_text() == (b / "recovery_log.csv").read_text()
    assert (a / "recovered" / "items.jsonl").read_text() == (b / "recovered" / "items.jsonl").read_text()
    assert not (recovered / "tiny-llama_resume").exists()  # cleared once the recovered model is written
