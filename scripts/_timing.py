"""Timing helpers shared by the benchmark scripts (`from _timing import best_of, median_over_seeds`; `python scripts/X.py`
puts this folder on the import path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple


class Timing(NamedTuple):
    """One run's wall and CPU time in milliseconds (this process's CPU time: it counts work, so it moves
    less than wall time when other jobs share the cores). Orders by wall time first."""

    wall_ms: float
    cpu_ms: float


def best_of(fn: Callable[[], object], runs: int, warmup: bool = True) -> Timing:
    """The fastest (by wall time) of `runs` timed calls of `fn`, after one untimed call when `warmup`
    (compilation, first-touch allocation). `fn` must block until its work is done."""
    if warmup:
        fn()
    times = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(Timing((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return min(times)


def median_over_seeds(generate: Callable[..., object], runs: int) -> float | None:
    """Median wall seconds of `generate(seed=seed)` for seeds 1..runs (seed 0 is the caller's warm-up call:
    a new seed per run, so no run repeats another's work); None when `runs` is 0."""
    times = []
    for seed in range(1, runs + 1):
        t0 = time.perf_counter()
        generate(seed=seed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else None
