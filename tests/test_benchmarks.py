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


def test_pairs_benchmark_reports_both_paths_with_no_decision_differing(tmp_path, tokenizer, shared_data, capsys):
    folder = save_tiny_model("gpt2", tokenizer, tmp_path / "tiny-gpt2")
    bench = load_benchmark("bench_pairs.py")
    bench.main(["--model", str(folder), "--winobias", str(shared_data / "winobias" / "data"),
                "--crows", str(shared_data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv"),
                "--limit", "6", "--repeats", "1", "--batch-size", "4"])
    out = capsys.readouterr().out
    for name in ("WinoBias", "CrowS gender"):
        found = re.search(rf"{name}: 6 pairs; tokens computed (\d+) shared, (\d+) separate; .* speed-up \d+\.\d\dx; "
                          r"max \|score difference\| (\S+), decisions differing 0", out)
        assert found and int(found.group(1)) < int(found.group(2)) and float(found.group(3)) < 1e-4, out
    assert re.search(r"fp32 matmul: before the timings \d+ GFLOP/s wall", out), out
