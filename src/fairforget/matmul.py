"""The machine's fp32 matmul rate, measured now: quoted beside every wall time (machines differ several-fold)."""

from __future__ import annotations

import statistics
import time

import torch


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


def rates_text(rates: tuple[float, float]) -> str:
    """``158 GFLOP/s wall, 114 per CPU second`` (fp32 2048^3 matmul)."""
    return f"{rates[0]:.0f} GFLOP/s wall, {rates[1]:.0f} per CPU second"
