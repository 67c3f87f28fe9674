"""Helpers shared by the benchmark scripts: robust timing and the machine's fp32 matmul rate."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fairforget.matmul import matmul_rates  # noqa: F401 (the benchmarks' import point)
from fairforget.progress import progress


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, desc: str = "timing") -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (a bar when it lasts)."""
    for _ in progress(range(warmup), desc=f"{desc} (warm-up)", unit="run"):
        fn()
    times = []
    for _ in progress(range(repeats), desc=desc, unit="run"):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Achieved fp32 GFLOP/s of a ``size``^3 matrix product on this machine, now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9
