"""BBQ answer-mode scoring: the prompt computed once and shared by its three options (and the preamble common
to all prompts computed once per call), against each option scored as its own full sequence (prompt +
option), on SmolLM2-135M-Instruct, both in the same run.

    python benchmarks/bench_bbq.py [--quick] [--n 96] [--batch-size 8] [--repeats 3]

Prompts are real BBQ items (stratified over categories, chat template on). Timings alternate between the
two paths so that load from other processes hits both alike; prints the median wall and process-CPU
times (CPU time is the steadier measure on a shared machine), their ratios and the largest score
difference between the paths.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_eval import answer_continuation, build_prompt, option_order
from fairforget.choice_scoring import (encode_option, encode_prompt, option_logprobs, score_options_separately,
                                       shared_preamble)
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.progress import progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="22 prompts, 1 timed repeat")
    parser.add_argument("--n", type=int, default=96, help="prompts (3 options each)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (x3 sequences when separate)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("data/bbq"))
    args = parser.parse_args()
    n, repeats = (22, 1) if args.quick else (args.n, args.repeats)
    torch.manual_seed(0)

    examples = sample_per_category(load_bbq(args.data_dir).examples, max(1, -(-n // 11)), seed=0)[:n]
    loaded = load_model(DEFAULT_EMBEDDED, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts, options = [], []
    for e in examples:
        order = option_order(e)
        prompt = build_prompt(e, order, chat_tokenizer=tokenizer)
        prompts.append(prompt)
        options.append([answer_continuation(prompt, e.answers[i]) for i in order])
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    prompt_tokens = sum(len(e) for e in encoded)
    with torch.inference_mode():
        preamble_tokens = shared_preamble(model, encoded, torch.device("cpu")).length
    option_tokens = sum(len(encode_option(tokenizer, o)) for opts in options for o in opts)

    def shared():
        return option_logprobs(model, tokenizer, prompts, options, batch_size=args.batch_size)

    def separate():
        return score_options_separately(model, tokenizer, prompts, options, batch_size=3 * args.batch_size)

    a, b = shared(), separate()  # also the warm-up
    max_diff = max(abs(x.logprob - y.logprob) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    wall: dict[str, list[float]] = {"shared": [], "separate": []}
    cpu: dict[str, list[float]] = {"shared": [], "separate": []}
    for _ in progress(range(repeats), desc="repeats (shared, separate)", unit="repeat", delay=0):
        for name, fn in (("shared", shared), ("separate", separate)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"{len(prompts)} BBQ prompts x 3 options, {prompt_tokens / len(prompts):.0f} prompt tokens and "
          f"{option_tokens / (3 * len(prompts)):.1f} option tokens on average ({preamble_tokens} preamble tokens "
          f"common to all prompts), {torch.get_num_threads()} threads")
    for label, times in (("wall", wall), ("CPU", cpu)):
        t_shared, t_separate = (statistics.median(times[k]) for k in ("shared", "separate"))
        print(f"{label:>4}: shared prompt {t_shared:7.2f} s ({len(prompts) / t_shared:5.2f} prompts/s), separate "
              f"options {t_separate:7.2f} s ({len(prompts) / t_separate:5.2f} prompts/s): "
              f"speed-up {t_separate / t_shared:.2f}x (median of {repeats})")
    print(f"max |score difference| {max_diff:.2e}")


if __name__ == "__main__":
    main()
