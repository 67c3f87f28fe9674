"""The progress entry point: whole lines when output is not a terminal, silence when quiet or short."""

import io
import json

import pytest

from fairforget import progress as progress_module
from fairforget.progress import progress, set_quiet


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("FAIRFORGET_PROGRESS_SECONDS", "0")
    monkeypatch.delenv("FAIRFORGET_QUIET", raising=False)
    yield
    set_quiet(False)


def test_not_a_terminal_gets_one_whole_line_per_update(every_update):
    out = io.StringIO()
    assert list(progress(range(4), desc="scoring", unit="batch", delay=0, file=out)) == [0, 1, 2, 3]
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[2] for line in lines] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert all(line.startswith("scoring:") for line in lines)


def test_postfix_set_before_update_is_on_that_line_and_nothing_is_repeated(every_update):
    out = io.StringIO()
    with progress(total=2, desc="train", unit="step", delay=0, file=out) as bar:
        for loss in (1.5, 0.5):
            bar.set_postfix(loss=loss)
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "1/2" in lines[1] and "loss=1.5" in lines[1]
    assert "2/2" in lines[2] and "loss=0.5" in lines[2]


def test_quiet_and_short_loops_print_nothing(every_update, monkeypatch):
    for quiet_by in ("call", "environment", "short"):
        out = io.StringIO()
        if quiet_by == "call":
            set_quiet(True)
        elif quiet_by == "environment":
            monkeypatch.setenv("FAIRFORGET_QUIET", "1")
        delay = 60.0 if quiet_by == "short" else 0
        assert sum(progress(range(5), desc="x", delay=delay, file=out)) == 10
        assert out.getvalue() == ""
        set_quiet(False)
        monkeypatch.delenv("FAIRFORGET_QUIET", raising=False)
    assert not progress_module.is_quiet()


def test_a_nested_bar_in_a_log_prints_no_cursor_moves(every_update):
    out = io.StringIO()
    with progress(total=2, desc="outer", delay=0, file=out) as outer:
        for _ in range(2):
            list(progress(range(2), desc="inner", delay=0, file=out))
            outer.update(1)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and all(line.split(":")[0] in ("outer", "inner") for line in lines)
    assert sum(line.startswith("inner") for line in lines) == 6


def test_a_wrapped_training_loop_prints_one_bar(every_update, monkeypatch, capsys, tmp_path, tokenizer, shared_data):
    """Stage 31 names the fine-tune's bar instead of wrapping lora.finetune (which has its own) in a second one."""
    from conftest import load_script
    from fairforget.tiny import save_tiny_model
    from fairforget.winogender import load_winogender_pairs, write_pairs_tsv

    monkeypatch.setattr(progress_module, "DELAY_SECONDS", 0.0)
    wino = shared_data / "winogender" / "data"
    pairs = tmp_path / "pairs.tsv"
    write_pairs_tsv(pairs, load_winogender_pairs(wino / "all_sentences.tsv", wino / "occupations-stats.tsv")[:12])
    cda = load_script("31_cda.py")
    swaps = [shared_data / "winobias" / name for name in ("generalized_swaps.txt", "extra_gendered_words.txt")]
    capsys.readouterr()
    cda.main(cda.Config(model=str(save_tiny_model("llama", tokenizer, tmp_path / "m")), pairs=pairs, swap_lists=swaps,
                        out=tmp_path / "cda", log_dir=tmp_path / "log", epochs=2, batch_size=8, device="cpu"))
    steps = json.loads((tmp_path / "log" / "method.json").read_text())["steps"]
    bars = [line for line in capsys.readouterr().out.splitlines() if f"/{steps} [" in line]
    assert {line.split(":")[0] for line in bars} == {"CDA fine-tune"}
    assert [line.split()[3] for line in bars] == [f"{n}/{steps}" for n in range(steps + 1)]
