"""Timing candidates against each other on the machine in hand: the engine's kernel choices
(engine/kernels.py, engine/core.py) and the int8 backends (quantize.py) all decide by it."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_times(*fns: Callable[[], object], seconds: float = 0.6, runs: int = 20) -> list[float]:
    """Best time of each candidate, the calls interleaved (a, b, a, b, ...) so that a burst
    of load from elsewhere on the machine slows both alike instead of deciding the choice."""
    for fn in fns:
        fn()  # first call: kernel selection, compilation
    best, deadline = [float("inf")] * len(fns), time.perf_counter() + seconds
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return best
