"""Shared helpers of the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int
                ) -> tuple[float, list[float]]:
  """Runs `fn` `repeats` times; returns (median seconds, all times)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times
