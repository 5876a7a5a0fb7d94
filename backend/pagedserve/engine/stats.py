"""What the engine counts as it steps, for serving metrics (vLLM's IterationStats, cumulative).

Token counts move every step. Observations that come once per token (inter-token latency) or
once per step (tokens per step) are kept as bucket counts here, so a reader (the metrics
thread) writes their change once per interval, however many tokens it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

# vLLM's buckets (vllm/v1/metrics/loggers.py) for these histograms.
INTER_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram's state: observations per bucket (``value <= bound``, the last one for
    values above every bound) and the sum of all observations."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Owns the bucket counts and the sum of one histogram's observations."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self._edges = np.asarray(self.bounds)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[int(np.searchsorted(self._edges, value))] += 1
        self._sum += value

    def observe_many(self, values: list[float]) -> None:
        """Adds many observations with one vectorized bucketing."""
        if not values:
            return
        array = np.asarray(values, dtype=np.float64)
        np.add.at(self._counts, np.searchsorted(self._edges, array), 1)
        self._sum += float(array.sum())

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts.tolist()), self._sum)


class EngineCounters:
    """Owns the engine's cumulative counts since start: prompt tokens (counted when a request
    produces its first token), generated tokens, tokens computed per step, and the latency
    between consecutive tokens of each completion. Updated on the engine thread only."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)
        self.inter_token_latency = Histogram(INTER_TOKEN_LATENCY_BUCKETS)
