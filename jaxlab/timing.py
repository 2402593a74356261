"""The one timing rule of the benchmarks (experiments/bench_*.py), so that both sides of a
comparison are timed alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


def best_of(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    """(the last call's output, seconds of the fastest of `repeats` calls) after one warm-up call
    (compilation); JAX outputs are waited for, other outputs are ready when `fn` returns."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best
