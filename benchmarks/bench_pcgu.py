"""PCGU step cost against the two forward+backward passes it needs, and vectorised vs per-row selection.

    python benchmarks/bench_pcgu.py [--model embedded:smollm2-135m-instruct] [--batch-size 16] [--repeats 3]

Both timings come from the same run on the same batch of WinoGender pairs. Selection and update should add
at most 15% to the two passes. Prints median seconds and ratios.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fairforget.config import run_script
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.methods.pcgu import encode_pairs, gradients, partition_cosines, partition_tensors, pcgu_step
from fairforget.progress import progress
from fairforget.scoring import collate
from fairforget.winogender import load_winogender_pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds  # noqa: E402


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    winogender_dir: Path = Path("data/winogender/data")
    batch_size: int = 16
    repeats: int = 3
    k: int = 10_000
    loop_tensors: int = 12  # tensors timed with the per-row Python loop (it is slow)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"


def main(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(True)
    tensors = partition_tensors(model)
    pairs = load_winogender_pairs(cfg.winogender_dir / "all_sentences.tsv",
                                  cfg.winogender_dir / "occupations-stats.tsv")[: cfg.batch_size]
    adv, dis = encode_pairs(tok, pairs)
    pad, device = tok.pad_token_id, loaded.device
    batch_a, batch_d = collate(adv, pad, device), collate(dis, pad, device)
    # lr 0: the step does all its work but leaves the weights as they are, so every repeat sees the same model
    step = lambda: pcgu_step(model, tensors, adv, dis, pad, cfg.k, 0.0)  # noqa: E731
    passes = lambda: (gradients(model, tensors, batch_a), gradients(model, tensors, batch_d))  # noqa: E731
    step()  # warm-up
    t_passes, t_step = [], []
    for _ in progress(range(cfg.repeats), desc="repeats (passes, step)", unit="repeat", delay=0):  # interleaved
        t_passes.append(median_seconds(passes, repeats=1, warmup=0))
        t_step.append(median_seconds(step, repeats=1, warmup=0))
    passes_s, step_s = statistics.median(t_passes), statistics.median(t_step)
    print(f"{loaded.name}: batch {cfg.batch_size} pairs, {sum(t.n_partitions for t in tensors):,} row partitions")
    print(f"two forward+backward passes: {passes_s:.3f} s; full PCGU step: {step_s:.3f} s; "
          f"step / passes = {step_s / passes_s:.3f} (selection + update add {100 * (step_s / passes_s - 1):+.1f}%)")

    _, g_a = gradients(model, tensors, batch_a)
    _, g_d = gradients(model, tensors, batch_d)
    subset = [i for i, t in enumerate(tensors) if t.axis is not None][: cfg.loop_tensors]

    def vectorised():
        return [partition_cosines(g_a[i], g_d[i], tensors[i].axis, tensors[i].n_partitions) for i in subset]

    def per_row():
        out = []
        for i in subset:
            a, d = g_a[i].movedim(tensors[i].axis, 0), g_d[i].movedim(tensors[i].axis, 0)
            out.append(torch.tensor([torch.nn.functional.cosine_similarity(a[r].flatten(), d[r].flatten(), dim=0)
                                     for r in range(a.shape[0])]))
        return out

    t_vec = median_seconds(vectorised, repeats=cfg.repeats, warmup=0)
    t_loop = median_seconds(per_row, repeats=1, warmup=0)
    rows = sum(tensors[i].n_partitions for i in subset)
    print(f"cosines of {rows:,} rows in {len(subset)} tensors: vectorised {t_vec:.4f} s, per-row loop {t_loop:.3f} s, "
          f"speed-up {t_loop / t_vec:.1f}x")


if __name__ == "__main__":
    run_script(main, Config())
