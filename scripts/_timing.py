"""Best-of-N timing, shared by the benchmark scripts (`from _timing import best_of`; `python scripts/X.py`
puts this folder on the import path)."""

from __future__ import annotations

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
