"""Interleaved timing and paired ratios: each round's time of a configuration over the reference's
time in the same round, so that load that changes between rounds cancels out.

Shared by the bench scripts (run as scripts: bench/ is on sys.path).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], min_time: float, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, one value per round; each round runs a block of every fn in turn
    (block sizes calibrated so that a block takes about min_time / reps)."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up
        n = 1
        while True:
            t = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - t >= min_time / reps or n >= 4096:
                break
            n *= 2
        inner[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / inner[name])
    return samples


def round_ratios(samples: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per round, every configuration's time over the reference's time in that round."""
    ref = samples[reference]
    return {name: [t / r for t, r in zip(times, ref)] for name, times in samples.items()}


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile); all three the median below 4 values."""
    med = statistics.median(values)
    if len(values) < 4:
        return med, med, med
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return med, q1, q3


def verdict(low: float, median: float, high: float, target: float) -> str:
    """"yes" when even the 75th percentile of the rounds meets the target, "NO" when even the 25th
    misses it, else "edge" (which side the median falls on is this run's noise)."""
    if high <= target:
        return "yes"
    if low > target:
        return "NO"
    return f"edge ({'yes' if median <= target else 'no'} at the median)"
