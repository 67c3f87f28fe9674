"""Sentence-pair scoring speed on SmolLM2-135M: WinoBias test pairs and CrowS-Pairs, each pair's shared start
computed once (``choice_scoring.score_sentence_groups``) against every sentence its own sequence
(``scoring.score_continuations``), both batched the same, in the same run.

    python benchmarks/bench_pairs.py                 # every minimal WinoBias test pair and every CrowS gender pair
    python benchmarks/bench_pairs.py --limit 200     # the first 200 pairs of each

Prints, per data set, the tokens each path computes, the median wall time of each (alternating, after a
warm-up), the speed-up, the largest score difference and how many decisions differ (none should), beside the
fp32 matmul rate measured before and after the timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_rates  # noqa: E402

from fairforget.choice_scoring import score_sentence_groups, sentence_group_ids  # noqa: E402
from fairforget.evals.crows import load_crows  # noqa: E402
from fairforget.evals.winobias import load_winobias, select_pairs  # noqa: E402
from fairforget.matmul import rates_text  # noqa: E402
from fairforget.models import DEFAULT_EMBEDDED, load_model  # noqa: E402
from fairforget.progress import progress  # noqa: E402
from fairforget.scoring import encode, score_continuations  # noqa: E402


def compare(name: str, model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, repeats: int) -> None:
    paths = {"shared": lambda: [s for group in score_sentence_groups(model, tokenizer, pairs, batch_size)
                                for s in group],
             "separate": lambda: score_continuations(model, tokenizer, [("", s) for p in pairs for s in p],
                                                     batch_size=batch_size)}
    scores = {k: fn() for k, fn in paths.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in progress(range(repeats), desc=f"{name} repeats", unit="repeat", delay=0):
        for k, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    shared_tokens = sum(len(p) + sum(map(len, o)) for p, o in (sentence_group_ids(tokenizer, g) for g in pairs))
    separate_tokens = sum(len(encode(tokenizer, "", s).ids) for p in pairs for s in p)
    a, b = scores["shared"], scores["separate"]
    diff = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
    flips = sum((a[i].logprob > a[i + 1].logprob) != (b[i].logprob > b[i + 1].logprob) for i in range(0, len(a), 2))
    t_shared, t_separate = (statistics.median(times[k]) for k in paths)
    print(f"{name}: {len(pairs)} pairs; tokens computed {shared_tokens} shared, {separate_tokens} separate; "
          f"shared {t_shared:.2f} s, separate {t_separate:.2f} s (median of {repeats}, batch {batch_size}): "
          f"speed-up {t_separate / t_shared:.2f}x; max |score difference| {diff:.1e}, decisions differing {flips}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--winobias", type=Path, default=Path("data/winobias/data"))
    parser.add_argument("--crows", type=Path, default=Path("data/crows_pairs/data/crows_pairs_anonymized.csv"))
    parser.add_argument("--limit", type=int, default=None, help="the first N pairs of each data set (default all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=DEFAULT_EMBEDDED)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, "cpu")
    data = {"WinoBias": [(p.pro, p.anti) for p in select_pairs(load_winobias(args.winobias))],
            "CrowS gender": [(p.stereotyping, p.other) for p in load_crows(args.crows) if p.bias_type == "gender"]}
    before = matmul_rates()
    for name, pairs in data.items():
        compare(name, loaded.model, loaded.tokenizer, pairs[: args.limit], args.batch_size, args.repeats)
    print(f"fp32 matmul: before the timings {rates_text(before)}; after {rates_text(matmul_rates())}")


if __name__ == "__main__":
    main()
