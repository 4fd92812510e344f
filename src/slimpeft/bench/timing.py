"""Side-by-side timing helpers: functions timed round-robin after a warm-up, their medians, and the spread of a
ratio over the rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 5,
                     sync: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Wall times of several functions timed round-robin (round j runs each once, in order), so that machine noise
    hits all of them alike: ``reps`` seconds per function, round by round.

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
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list of times."""
    return {k: statistics.median(v) for k, v in times.items()}


def round_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """min / median / max over rounds of num[j] / den[j], for two functions timed in the same rounds: the spread of
    a ratio that machine noise alone produces (both runs of a round saw the same machine state)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"round_ratios needs two equally long, non-empty lists of times (got {len(num)} and "
                         f"{len(den)})")
    r = [a / b for a, b in zip(num, den)]
    return {"min": min(r), "median": statistics.median(r), "max": max(r)}
