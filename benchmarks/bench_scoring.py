"""Scorer throughput on SmolLM2-135M against a one-sentence-at-a-time, full-logits reference (bias-bench style).

    python benchmarks/bench_scoring.py [--n 256] [--batch-size 32]

Both paths score the same StereoSet intrasentence sentences in the same run; prints the ratio and the
achieved GFLOP/s (2 x params x tokens / s) against this machine's fp32 matmul GFLOP/s measured now.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops, median_seconds  # noqa: E402

from fairforget.models import DEFAULT_EMBEDDED, load_model  # noqa: E402
from fairforget.scoring import encode, score_continuations  # noqa: E402
from fairforget.stereoset import load_stereoset  # noqa: E402


def reference_scores(model, tokenizer, requests):
    """One sequence at a time, logits over the whole vocabulary at every position, under no_grad."""
    out = []
    with torch.no_grad():
        for prefix, continuation in requests:
            item = encode(tokenizer, prefix, continuation)
            ids = torch.tensor([item.ids])
            logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
            targets = ids[0, item.n_prefix:]
            out.append(logprobs[item.n_prefix - 1: -1].gather(-1, targets[:, None]).sum().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=256, help="sentences to score")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path("data/stereoset/dev.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    examples = [e for e in load_stereoset(args.data) if e.split == "intrasentence"]
    requests = [("", s) for e in examples for _, s in e.sentences.values()][: args.n]
    loaded = load_model(DEFAULT_EMBEDDED, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    n_tokens = sum(len(encode(tokenizer, p, c).ids) for p, c in requests)

    ours = score_continuations(model, tokenizer, requests, batch_size=args.batch_size)
    ref = reference_scores(model, tokenizer, requests)
    max_diff = max(abs(a.logprob - b) for a, b in zip(ours, ref))

    t_ours = median_seconds(lambda: score_continuations(model, tokenizer, requests, batch_size=args.batch_size),
                            repeats=args.repeats)
    t_ref = median_seconds(lambda: reference_scores(model, tokenizer, requests), repeats=args.repeats)
    peak = matmul_gflops()
    achieved = 2 * n_params * n_tokens / t_ours / 1e9
    print(f"{len(requests)} sentences, {n_tokens} tokens, {n_params / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads; max |score difference| {max_diff:.2e}")
    print(f"reference (one at a time, full logits): {t_ref:7.2f} s  {n_tokens / t_ref:8.0f} tokens/s")
    print(f"fairforget scorer (batch {args.batch_size}):       {t_ours:7.2f} s  {n_tokens / t_ours:8.0f} tokens/s")
    print(f"speed-up: {t_ref / t_ours:.2f}x (aim >= 3x)")
    print(f"achieved {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of the fp32 matmul rate "
          f"{peak:.0f} GFLOP/s measured now (aim >= 60%)")


if __name__ == "__main__":
    main()
