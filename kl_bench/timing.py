"""Timing one call of a kernel: the work, not the launch or the compiler."""

from __future__ import annotations

import time

import numpy as np


def median_seconds(fn, be, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed call (warm-up and
    compilation); each call is synchronised with the backend (CUDA, JAX) before the clock is read."""
    be.sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        be.sync(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
