"""Two CPU processes (gloo) give exactly the results of one: sharded StereoSet, CrowS-Pairs and BBQ scoring,
data-parallel LoRA fine-tuning, rank-0-only writes; and a stage script under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairforget import distributed

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "base" / "smollm2-135m-instruct"
TEXTS = [f"The {job} said that {who} would arrive {when}." for job in ("nurse", "engineer", "teacher")
         for who in ("he", "she") for when in ("soon", "late", "at noon")][:15]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(data: Path, tokenizer, rank_dir: Path | None = None) -> dict:
    """What each process computes; with several processes every call below is sharded / data-parallel."""
    from fairforget.evals import bbq, bbq_eval, crows, stereoset
    from fairforget.methods.lora import add_lora, finetune
    from fairforget.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer, seed=0)
    examples = stereoset.stratified_limit(stereoset.load_stereoset(data / "stereoset" / "dev.json"), 24, 0)
    _, ss_items = stereoset.evaluate_stereoset(model, tokenizer, examples, batch_size=4, n_boot=20)
    pairs = crows.sample_pairs(crows.load_crows(data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv"), 20)
    crows_items = crows.score_pairs(model, tokenizer, pairs, batch_size=4)
    bbq_data = bbq.load_bbq(data / "bbq", ["Age", "Religion"])
    chosen = bbq.sample_per_category(bbq_data.examples, 6, 0)
    _, letter_items = bbq_eval.evaluate_bbq(model, tokenizer, chosen, "letter", "off", batch_size=3, n_boot=20)
    _, answer_items = bbq_eval.evaluate_bbq(model, tokenizer, chosen, "answer", "off", batch_size=3, n_boot=20)
    lora = add_lora(build_tiny_model("llama", tokenizer, seed=1), ["q_proj", "v_proj"], dropout=0.0, seed=0)
    history = finetune(lora, tokenizer, TEXTS, epochs=2, batch_size=5, lr=5e-3, seed=0)  # last batch: 5 of 15
    if rank_dir is not None:
        from fairforget.artifacts import write_json

        write_json(rank_dir / "written.json", {"rank": distributed.rank()})
    return {"stereoset": ss_items, "crows": crows_items, "bbq_letter": letter_items, "bbq_answer": answer_items,
            "loss": [h.loss for h in history], "tokens": [h.n_items for h in history],
            "lora": {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}}


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    from transformers import AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu")
    assert (distributed.rank(), distributed.world_size()) == (rank, world)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    result = _workload(Path(data), tokenizer, Path(out))
    result["shard"] = distributed.shard(list(range(7)))
    result["block"] = distributed.shard(list(range(7)), strided=False)
    result["all_sum"] = distributed.all_sum(rank + 1)
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory, shared_data, tokenizer):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(shared_data), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.fixture(scope="module")
def one_process_results(shared_data, tokenizer):
    assert not distributed.active()
    return _workload(shared_data, tokenizer)


@pytest.mark.parametrize("kind", ["stereoset", "crows", "bbq_letter", "bbq_answer"])
def test_sharded_evaluation_equals_one_process(two_process_results, one_process_results, kind):
    results, _ = two_process_results
    single = one_process_results[kind]
    assert len(single) >= 10
    for r in results:  # both processes hold the whole, identical result, bit for bit
        assert r[kind] == single


def test_data_parallel_lora_equals_one_process(two_process_results, one_process_results):
    results, _ = two_process_results
    single = one_process_results
    for r in results:
        assert r["tokens"] == single["tokens"]
        assert r["loss"] == pytest.approx(single["loss"], abs=1e-5)
        for name, value in single["lora"].items():
            assert torch.allclose(r["lora"][name], value, atol=1e-5, rtol=0), name
    assert any(float(v.abs().max()) > 0 for n, v in single["lora"].items() if "lora_B" in n)  # it did train
    # the processes stayed bitwise in step with each other
    assert all(torch.equal(results[0]["lora"][n], results[1]["lora"][n]) for n in single["lora"])


def test_shards_partition_and_only_rank_zero_writes(two_process_results):
    results, out = two_process_results
    assert [r["shard"] for r in results] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [r["block"] for r in results] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [r["all_sum"] for r in results] == [3, 3]
    assert json.loads((out / "written.json").read_text()) == {"rank": 0}
    assert sorted(p.name for p in out.iterdir()) == ["rank0.pt", "rank1.pt", "written.json"]  # no temporaries


def test_alone_every_helper_is_the_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.shard([1, 2, 3], strided=False) == [1, 2, 3]
    assert distributed.gather_batches([([0], "a")]) == [([0], "a")]
    assert distributed.all_sum(2.5) == 2.5


def test_stage_script_under_torchrun_writes_the_single_process_result(tmp_path, shared_data, tokenizer):
    from fairforget.tiny import save_tiny_model

    model = save_tiny_model("gpt2", tokenizer, tmp_path / "tiny-gpt2")
    script = str(REPO / "scripts" / "13_evaluate_stereoset.py")
    args = [script, "--model", str(model), "--data", str(shared_data / "stereoset" / "dev.json"), "--limit", "30",
            "--batch-size", "8", "--n-boot", "50", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    from conftest import load_script
    from fairforget.config import run_script

    stage = load_script("13_evaluate_stereoset.py")  # one process: the same entry point, in this interpreter
    run_script(stage.main, stage.Config(), args[1:] + ["--out", str(tmp_path / "one")])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port())]
    double = subprocess.run([*launch, *args, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert double.returncode == 0, double.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "items.jsonl").read_text() == (two / "items.jsonl").read_text()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1.pop("provenance")["processes"], m2.pop("provenance")["processes"]) == (1, 2)
    assert m1 == m2
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
