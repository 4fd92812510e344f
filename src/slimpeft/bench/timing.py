"""Side-by-side timing helpers: warm-up, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 5,
                        sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Medians of several functions timed round-robin, so that machine noise hits all of them alike.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it stops: work queued
    on an asynchronous device is then counted in the run that queued it.
    """
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
