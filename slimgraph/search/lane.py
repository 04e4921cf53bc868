"""The latency lane: every timing goes through one object in the driver, one candidate at a
time, while no worker is busy (the driver times a batch after the executor returned it),
so concurrent candidates never disturb each other's timings.

Each candidate is timed against the original in the same `ort.bench` call (interleaved,
spinning off) and its latency is the median over rounds of candidate time / original time:
load drifts that hit both cancel. The original timed against itself is the control.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from slimgraph.backends import ort


class LatencyLane:
    def __init__(self, model_path: str, feeds: Mapping[str, np.ndarray], *, runs: int = 20,
                 warmup: int = 3, threads: int = 1):
        self.feeds, self.runs, self.warmup, self.threads = dict(feeds), runs, warmup, threads
        self._lock = threading.Lock()
        self._baseline = ort.session(model_path, threads=threads, spinning=False)

    def measure(self, path: str) -> tuple[float, float]:
        """(candidate median ms, median paired ratio to the original)."""
        with self._lock:
            stats = ort.bench({"original": self._baseline, "candidate": path}, self.feeds,
                              runs=self.runs, warmup=self.warmup, threads=self.threads)
        return stats["candidate"].median, stats["candidate"].ratio_to(stats["original"])
