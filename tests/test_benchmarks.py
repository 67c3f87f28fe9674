"""The benchmark scripts run end to end (on tiny models; their timings are not checked here)."""

import importlib.util
import re
import sys
from pathlib import Path

from fairforget.tiny import save_tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location("bench_" + Path(name).stem, BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pcgu_benchmark_reports_both_ratios(tmp_path, tokenizer, shared_data, capsys):
    folder = save_tiny_model("llama", tokenizer, tmp_path / "tiny-llama")
    bench = load_benchmark("bench_pcgu.py")
    bench.main(bench.Config(model=str(folder), winogender_dir=shared_data / "winogender" / "data", batch_size=4,
                            repeats=1, k=100, loop_tensors=2))
    out = capsys.readouterr().out
    assert re.search(r"step / passes = \d+\.\d{3}", out), out
    assert re.search(r"cosines of [\d,]+ rows in 2 tensors: .* speed-up \d+\.\dx", out), out


def test_scoring_benchmark_reports_the_dev_mix_against_the_floor(tmp_path, tokenizer, shared_data, capsys):
    folder = save_tiny_model("llama", tokenizer, tmp_path / "tiny-llama")
    bench = load_benchmark("bench_scoring.py")
    bench.main(["--model", str(folder), "--data", str(shared_data / "stereoset" / "dev.json"), "--limit", "12",
                "--n", "4", "--repeats", "0", "--profile"])
    out = capsys.readouterr().out
    assert re.search(r"dev mix: 1\d examples \(\d+ intra, \d+ inter\)", out), out
    assert re.search(r"wall: shared contexts .* = \d+\.\d\dx floor .* speed-up \d+\.\d\dx", out), out
    diff = float(re.search(r"max \|score difference\| shared vs separate (\S+)", out).group(1))
    assert diff < 1e-4
    assert re.search(r"profile of one shared-context pass: .* = \d+\.\d\dx the floor", out), out
    assert re.search(r"matmul +\d+\.\d\d s +\d+\.\d\dx floor", out) and "padding, intrasentence batches" in out
