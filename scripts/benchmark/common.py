"""What the sections share: the catalogue's category count and the timing helpers."""
import contextlib
import time
from typing import Callable

import numpy as np
import torch

NUM_CLASSES = 13  # root categories of the marketplace data


def time_calls(function: Callable[[], object], *, min_seconds: float, min_repeats: int = 3,
               max_repeats: int = 200, warmup: int = 1) -> list[float]:
    """Seconds per call after `warmup` untimed calls, repeated until both minimums are met."""
    for _ in range(warmup):
        function()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - started < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def percentiles_ms(seconds: list[float], points=(50, 95, 99)) -> dict[str, float]:
    values = np.percentile(np.asarray(seconds) * 1000, points)
    return {f"p{point}_ms": float(value) for point, value in zip(points, values)}


@contextlib.contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
