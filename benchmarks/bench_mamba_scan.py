"""Benchmark fairforget's fast Mamba path against transformers' reference path on CPU.

Randomly initialised Mamba-130M (real shape, fp32). Reports forward (no grad, scoring) and
forward+backward (training step on the LM loss) times at batch 8 x 32 and 8 x 64 tokens,
the speed-ups, the fwd+bwd time against the matmul floor (6 x params x tokens FLOPs at the
fp32 GFLOP/s of a 2048^3 matmul measured in the same run), and the fast path's fwd+bwd
time at 32..256 tokens to show linear growth.

    PYTHONPATH=src python benchmarks/bench_mamba_scan.py [--quick]
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

from fairforget.mamba_native import native_library
from fairforget.mamba_scan import disable_fast_mamba, enable_fast_mamba

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops, median_seconds  # noqa: E402

BATCH = 8
MAMBA_130M = MambaConfig(
    hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16, expand=2, conv_kernel=4
)


def forward_step(model, input_ids):
    model.eval()
    with torch.no_grad():
        model(input_ids, use_cache=False)


def train_step(model, input_ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=input_ids).loss.backward()


def time_path(model, input_ids, repeats: int) -> tuple[float, float]:
    return (
        median_seconds(lambda: forward_step(model, input_ids), repeats, desc="forward"),
        median_seconds(lambda: train_step(model, input_ids), repeats, desc="forward+backward"),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat; reference and scaling at fewer lengths")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    lengths = [32] if args.quick else [32, 64]
    scaling_lengths = [32, 64, 128] if args.quick else [32, 64, 128, 256]
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    model = MambaForCausalLM(MAMBA_130M)
    params = sum(p.numel() for p in model.parameters())
    gflops = matmul_gflops(repeats=max(repeats, 5))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fast scan backend: {'native C' if native_library() is not None else 'pure PyTorch'}")
    print(f"Mamba-130M random init: {params / 1e6:.1f}M params; fp32 matmul {gflops:.0f} GFLOP/s (2048^3)\n")

    header = (f"{'tokens':>8} | {'ref fwd':>8} {'fast fwd':>8} {'x':>6} | {'ref f+b':>8} {'fast f+b':>8} "
              f"{'x':>6} | {'floor':>6} {'f+b/floor':>9}")
    print(header)
    print("-" * len(header))
    for length in lengths:
        input_ids = torch.randint(0, MAMBA_130M.vocab_size, (BATCH, length))
        enable_fast_mamba(model)
        fast_fwd, fast_train = time_path(model, input_ids, repeats)
        disable_fast_mamba(model)
        # The reference path has nothing to warm up beyond the fast path's run; one repeat of its
        # quadratic backward at 8x64 already takes minutes.
        ref_fwd = median_seconds(lambda: forward_step(model, input_ids), repeats, warmup=0)
        ref_train = median_seconds(lambda: train_step(model, input_ids), 1, warmup=0)
        floor = 6 * params * BATCH * length / (gflops * 1e9)
        print(f"{BATCH}x{length:<6} | {ref_fwd:7.2f}s {fast_fwd:7.2f}s {ref_fwd / fast_fwd:5.1f}x | "
              f"{ref_train:7.2f}s {fast_train:7.2f}s {ref_train / fast_train:5.1f}x | "
              f"{floor:5.2f}s {fast_train / floor:8.2f}x")

    print("\nfast path fwd+bwd vs length (linear growth expected)")
    print(f"{'tokens':>8} | {'f+b':>7} {'per token':>10} {'f+b/floor':>9}")
    enable_fast_mamba(model)
    for length in scaling_lengths:
        input_ids = torch.randint(0, MAMBA_130M.vocab_size, (BATCH, length))
        seconds = median_seconds(lambda: train_step(model, input_ids), repeats)
        floor = 6 * params * BATCH * length / (gflops * 1e9)
        print(f"{BATCH}x{length:<6} | {seconds:6.2f}s {seconds / (BATCH * length) * 1e3:8.2f}ms "
              f"{seconds / floor:8.2f}x")


if __name__ == "__main__":
    main()
