"""StereoSet scoring speed on SmolLM2-135M: the dev mix (intra + intersentence) against the FLOP floor and
against scoring every candidate as its own sequence; and the batched scorer against a one-sentence-at-a-time,
full-logits reference (bias-bench style).

    python benchmarks/bench_scoring.py                     # full dev (4229 examples, 12687 sentences)
    python benchmarks/bench_scoring.py --limit 300 --n 0   # a stratified 300-example subset, no reference
    python benchmarks/bench_scoring.py --profile           # and where one pass spends its time

Dev mix: ``stereoset.score_examples`` (each intersentence context, and the words before an intrasentence blank,
computed once for its three candidates) against the same scores computed as before, every (context, candidate)
a separate sequence. The floor is
2 x parameters x (scored tokens + conditioning tokens, each shared prompt counted once) at this machine's fp32
matmul rate measured in the same run (before and after the timings; the higher is used), per wall second for
the wall times and per process-CPU second for the CPU times (the steadier measure on a shared machine).
Timings alternate between the paths so that load from other processes hits both alike; medians.
``--repeats 0`` times the first (cold) pass of each path instead of repeating them after it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops, matmul_rates, median_seconds  # noqa: E402

from fairforget.choice_scoring import sentence_group_ids  # noqa: E402
from fairforget.models import DEFAULT_EMBEDDED, load_model  # noqa: E402
from fairforget.progress import progress  # noqa: E402
from fairforget.scoring import encode, length_sorted_batches, score_continuations  # noqa: E402
from fairforget.evals.stereoset import load_stereoset, score_examples, scoring_requests, stratified_limit  # noqa: E402


def reference_scores(model, tokenizer, requests):
    """One sequence at a time, logits over the whole vocabulary at every position, under no_grad."""
    out = []
    with torch.no_grad():
        for prefix, continuation in progress(requests, desc="reference", unit="sentence"):
            item = encode(tokenizer, prefix, continuation)
            ids = torch.tensor([item.ids])
            logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
            targets = ids[0, item.n_prefix:]
            out.append(logprobs[item.n_prefix - 1: -1].gather(-1, targets[:, None]).sum().item())
    return out


def separate_scores(model, tokenizer, examples, batch_size):
    """The scores as computed before contexts were shared: every candidate request its own sequence."""
    requests = [(prefix, cont) for ex in examples for _, prefix, cont in scoring_requests(ex)]
    return score_continuations(model, tokenizer, requests, batch_size=batch_size, desc="separate")


def floor_tokens(tokenizer, examples) -> dict[str, int]:
    """Tokens a forward pass must cover at least: every candidate's tokens, each context's tokens once."""
    counts = {"intrasentence": 0, "intersentence": 0}
    for ex in examples:
        counts[ex.split] += _row_tokens(tokenizer, ex)
    return counts


def _row_tokens(tokenizer, example) -> int:
    """Tokens of an example's shared row: the prompt (intrasentence: the words before the blank, which the
    three candidates share; intersentence: the context) once, then each candidate's own tokens."""
    if example.split == "intrasentence":
        prompt, options = sentence_group_ids(tokenizer, [s for _, s in example.sentences.values()])
        return len(prompt) + sum(map(len, options))
    encoded = [encode(tokenizer, prefix, cont) for _, prefix, cont in scoring_requests(example)]
    return encoded[0].n_prefix + sum(e.n_scored for e in encoded)


def timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def dev_mix(model, tokenizer, examples, batch_size: int, repeats: int, n_params: int) -> None:
    tokens = floor_tokens(tokenizer, examples)
    n_tokens = sum(tokens.values())
    separate_tokens = sum(len(encode(tokenizer, p, c).ids) for ex in examples for _, p, c in scoring_requests(ex))
    rates_before = matmul_rates()
    paths = {"shared": lambda: score_examples(model, tokenizer, examples, batch_size),
             "separate": lambda: separate_scores(model, tokenizer, examples, batch_size)}
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    first = {}
    for name, fn in paths.items():  # the scores compared; also the warm-up (timed when repeats is 0)
        first[name], w, c = timed(fn)
        if repeats == 0:
            wall[name].append(w)
            cpu[name].append(c)
    max_diff = max(abs(a["logprob_sum"] - b.logprob) for a, b in zip(first["shared"], first["separate"]))
    for _ in progress(range(repeats), desc="dev-mix repeats", unit="repeat", delay=0):
        for name, fn in paths.items():
            _, w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    rates_after = matmul_rates()
    peak, peak_cpu = (max(b, a) for b, a in zip(rates_before, rates_after))
    flops = 2 * n_params * n_tokens
    floors = {"wall": flops / (peak * 1e9), "CPU": flops / (peak_cpu * 1e9)}
    n_inter = sum(e.split == "intersentence" for e in examples)
    print(f"dev mix: {len(examples)} examples ({len(examples) - n_inter} intra, {n_inter} inter), "
          f"{3 * len(examples)} sentences; floor tokens {n_tokens} (intra {tokens['intrasentence']}, "
          f"inter {tokens['intersentence']}; {separate_tokens} when every candidate is its own sequence)")
    print(f"fp32 matmul {peak:.1f} GFLOP/s wall, {peak_cpu:.1f} GFLOP per CPU-second (before the timings "
          f"{rates_before[0]:.1f} / {rates_before[1]:.1f}), {n_params / 1e6:.1f}M parameters: floor "
          f"{floors['wall']:.2f} s wall, {floors['CPU']:.2f} CPU-s; max |score difference| shared vs separate "
          f"{max_diff:.2e}")
    for label, times in (("wall", wall), ("CPU", cpu)):
        floor = floors[label]
        t_shared, t_separate = (statistics.median(times[k]) for k in paths)
        print(f"{label:>4}: shared contexts {t_shared:7.2f} s = {t_shared / floor:.2f}x floor (aim <= 1.5x); "
              f"separate {t_separate:7.2f} s = {t_separate / floor:.2f}x floor; "
              f"speed-up {t_separate / t_shared:.2f}x (median of {max(repeats, 1)}"
              f"{', cold' if repeats == 0 else ''}, batch {batch_size})")


def padding_tokens(tokenizer, examples, batch_size: int) -> dict[str, tuple[int, int]]:
    """(padded positions, real tokens) of the batches the shared path computes: rows of an example's shared
    prompt and its three candidates, grouped a third as many per batch."""
    intra = [_row_tokens(tokenizer, ex) for ex in examples if ex.split == "intrasentence"]
    inter = [_row_tokens(tokenizer, ex) for ex in examples if ex.split == "intersentence"]
    out, rows_per_batch = {}, max(1, batch_size // 3)
    for name, lengths in (("intra", intra), ("inter", inter)):
        batches = length_sorted_batches(lengths, rows_per_batch)
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        out[name] = (computed - sum(lengths), sum(lengths))
    return out


PROFILE_BUCKETS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm")), ("attention", ("scaled_dot_product",)),
                   ("log-softmax", ("aten::_log_softmax", "aten::gather")))


def profile(model, tokenizer, examples, batch_size: int, n_params: int) -> None:
    """Where one shared-context pass spends its time: tokenization, matrix products, attention, the
    vocabulary log-softmax, every other op (norms, rotary, activations, copies), and time outside any op
    (Python per batch: collation, masks, dispatch), beside padding and the FLOP floor at the matmul rate now."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    requests = [(p, c) for ex in examples for _, p, c in scoring_requests(ex)]
    _, t_tok, _ = timed(lambda: [encode(tokenizer, p, c) for p, c in requests])
    score_examples(model, tokenizer, examples[:8], batch_size)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _, wall, _ = timed(lambda: score_examples(model, tokenizer, examples, batch_size))
    rate = max(matmul_rates())
    floor = 2 * n_params * sum(floor_tokens(tokenizer, examples).values()) / (rate * 1e9)
    spent = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    other = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        bucket = next((name for name, keys in PROFILE_BUCKETS if any(k in event.key for k in keys)), None)
        seconds = event.self_cpu_time_total / 1e6
        if bucket:
            spent[bucket] += seconds
        else:
            other += seconds
    outside = wall - sum(spent.values()) - other
    parts = [("tokenization (all requests, timed apart)", t_tok), *spent.items(),
             ("other ops (norms, rotary, activations, copies)", other),
             ("outside ops (Python per batch: collation, masks, dispatch)", outside)]
    print(f"profile of one shared-context pass: {wall:.2f} s wall = {wall / floor:.2f}x the floor {floor:.2f} s "
          f"(fp32 matmul {rate:.1f} GFLOP/s measured now)")
    for name, seconds in parts:
        print(f"  {name:<60} {seconds:7.2f} s  {seconds / floor:5.2f}x floor")
    for name, (padded, real) in padding_tokens(tokenizer, examples, batch_size).items():
        print(f"  padding, {name}sentence batches: {padded} padded positions beside {real} tokens "
              f"({100 * padded / (padded + real):.1f}% of the positions computed)")


def versus_reference(model, tokenizer, examples, n: int, batch_size: int, repeats: int, n_params: int) -> None:
    repeats = max(repeats, 1)
    requests = [("", s) for e in examples if e.split == "intrasentence" for _, s in e.sentences.values()][:n]
    n_tokens = sum(len(encode(tokenizer, p, c).ids) for p, c in requests)
    ours = score_continuations(model, tokenizer, requests, batch_size=batch_size)
    ref = reference_scores(model, tokenizer, requests)
    max_diff = max(abs(a.logprob - b) for a, b in zip(ours, ref))
    t_ours = median_seconds(lambda: score_continuations(model, tokenizer, requests, batch_size=batch_size),
                            repeats=repeats)
    t_ref = median_seconds(lambda: reference_scores(model, tokenizer, requests), repeats=repeats)
    peak = matmul_gflops()
    achieved = 2 * n_params * n_tokens / t_ours / 1e9
    print(f"{len(requests)} intrasentence sentences, {n_tokens} tokens, {torch.get_num_threads()} threads; "
          f"max |score difference| {max_diff:.2e}")
    print(f"reference (one at a time, full logits): {t_ref:7.2f} s  {n_tokens / t_ref:8.0f} tokens/s")
    print(f"fairforget scorer (batch {batch_size}):       {t_ours:7.2f} s  {n_tokens / t_ours:8.0f} tokens/s")
    print(f"speed-up: {t_ref / t_ours:.2f}x (aim >= 3x)")
    print(f"achieved {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of the fp32 matmul rate "
          f"{peak:.0f} GFLOP/s measured now (aim >= 60%)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="stratified subset of dev examples (default all)")
    parser.add_argument("--n", type=int, default=256, help="intrasentence sentences against the reference (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path("data/stereoset/dev.json"))
    parser.add_argument("--model", default=DEFAULT_EMBEDDED)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile one shared-context pass")
    args = parser.parse_args(argv)

    examples = stratified_limit(load_stereoset(args.data), args.limit, seed=0)
    loaded = load_model(args.model, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    dev_mix(model, tokenizer, examples, args.batch_size, args.repeats, n_params)
    if args.profile:
        profile(model, tokenizer, examples, args.batch_size, n_params)
    if args.n > 0:
        versus_reference(model, tokenizer, examples, args.n, args.batch_size, args.repeats, n_params)


if __name__ == "__main__":
    main()
