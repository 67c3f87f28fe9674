"""Helpers shared by the benchmark scripts: robust timing and the machine's fp32 matmul rate."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

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


def matmul_rates(size: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """fp32 GFLOP per wall second and per process-CPU second of a ``size``^3 matrix product, medians, now.

    The CPU-time rate is the steadier floor on a shared machine (other processes' load slows the wall clock)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    flops = 2 * size**3 / 1e9
    return flops / statistics.median(wall), flops / statistics.median(cpu)


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Achieved fp32 GFLOP/s of a ``size``^3 matrix product on this machine, now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9
