"""Serving metrics through Triton's custom-metrics API (``pb_utils.MetricFamily``).

Names, kinds, help strings and buckets of the request metrics are vllm_backend's, so existing
dashboards work; the gauges and the preemption/prefix-cache counters come from the engine's
``EngineStats`` snapshot. Every metric call is an IPC round trip to the server process, so all
of them happen on one reporter thread: the request coroutines only enqueue a small record when
a request ends, and engine stats are read on a timer, never per step.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
E2E_BUCKETS = [1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]
N_BUCKETS = [1, 2, 5, 10, 20]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


@dataclass
class FinishedRequest:
    """What one request contributes to the metrics when it ends (finished or cancelled)."""

    prompt_tokens: int
    generation_tokens: int
    n: int
    e2e_latency: float
    time_to_first_token: Optional[float]
    # (seconds per token, how many tokens) runs: one observation per token after the first.
    inter_token: list[tuple[float, int]] = field(default_factory=list)


class TritonMetrics:
    """Owns the metric families and the one metric of each for this model's {model, version}."""

    def __init__(self, pb_utils: Any, labels: dict[str, str], max_model_len: int) -> None:
        family = pb_utils.MetricFamily

        def make(name: str, description: str, kind: Any, buckets: Optional[list] = None) -> Any:
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)  # a family lives only while referenced
            if buckets is None:
                return fam.Metric(labels=labels)
            return fam.Metric(labels=labels, buckets=[float(b) for b in buckets])

        self._families: list[Any] = []
        counter, gauge, histogram = family.COUNTER, family.GAUGE, family.HISTOGRAM
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = make(
            "vllm:prompt_tokens_total", "Number of prefill tokens processed.", counter)
        self.generation_tokens = make(
            "vllm:generation_tokens_total", "Number of generation tokens processed.", counter)
        self.ttft = make(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.", histogram, TTFT_BUCKETS)
        self.tpot = make(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.", histogram, TPOT_BUCKETS)
        self.e2e = make(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.", histogram, E2E_BUCKETS)
        self.request_prompt_tokens = make(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
            histogram, token_buckets)
        self.request_generation_tokens = make(
            "vllm:request_generation_tokens", "Number of generation tokens processed.",
            histogram, token_buckets)
        self.request_n = make(
            "vllm:request_params_n", "Histogram of the n request parameter.",
            histogram, N_BUCKETS)
        self.running = make(
            "vllm:num_requests_running", "Number of requests in the running batch.", gauge)
        self.waiting = make(
            "vllm:num_requests_waiting", "Number of requests waiting to be scheduled.", gauge)
        self.kv_usage = make(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 means 100 percent).", gauge)
        self.preemptions = make(
            "vllm:num_preemptions_total", "Cumulative number of preemptions.", counter)
        self.prefix_queries = make(
            "vllm:prefix_cache_queries_total",
            "Prefix-cache queries, in tokens (prompt tokens looked up).", counter)
        self.prefix_hits = make(
            "vllm:prefix_cache_hits_total",
            "Prefix-cache hits, in tokens (prompt tokens found cached).", counter)
        self._last_totals = (0, 0, 0)
        self._last_gauges: tuple = ()

    def record_request(self, r: FinishedRequest) -> None:
        if r.prompt_tokens:
            self.prompt_tokens.increment(r.prompt_tokens)
        if r.generation_tokens:
            self.generation_tokens.increment(r.generation_tokens)
        if r.time_to_first_token is not None:
            self.ttft.observe(r.time_to_first_token)
        for seconds, count in r.inter_token:
            for _ in range(count):
                self.tpot.observe(seconds)
        self.e2e.observe(r.e2e_latency)
        self.request_prompt_tokens.observe(r.prompt_tokens)
        self.request_generation_tokens.observe(r.generation_tokens)
        self.request_n.observe(r.n)

    def record_stats(self, stats: Any) -> None:
        """Gauges from an EngineStats snapshot; its cumulative counters become increments.

        Only changes are written: an idle model makes no metric calls at all. (A metric call
        that is in flight when the server goes away blocks the python stub for good.)
        """
        gauges = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        if gauges != self._last_gauges:
            for metric, value in zip((self.running, self.waiting, self.kv_usage), gauges):
                metric.set(value)
            self._last_gauges = gauges
        totals = (
            stats.num_preemptions_total,
            stats.prefix_cache_queries_total,
            stats.prefix_cache_hits_total,
        )
        for metric, now, before in zip(
            (self.preemptions, self.prefix_queries, self.prefix_hits), totals, self._last_totals
        ):
            if now > before:
                metric.increment(now - before)
        self._last_totals = totals


class MetricsReporter:
    """Owns the thread that writes metrics: request records from a queue, stats on a timer."""

    def __init__(
        self,
        metrics: TritonMetrics,
        read_stats: Callable[[], Any],
        interval_s: float,
        log_error: Callable[[str], None],
    ) -> None:
        self._metrics = metrics
        self._read_stats = read_stats
        self._interval = interval_s
        self._log_error = log_error
        self._queue: queue.SimpleQueue[Optional[FinishedRequest]] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="pagedserve-metrics", daemon=True
        )
        self._thread.start()

    def request_finished(self, record: FinishedRequest) -> None:
        self._queue.put(record)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        next_stats = time.monotonic()
        while True:
            record: Optional[FinishedRequest] = None
            stopping = False
            try:
                record = self._queue.get(timeout=max(0.0, next_stats - time.monotonic()))
                stopping = record is None
            except queue.Empty:
                pass
            try:
                if record is not None:
                    self._metrics.record_request(record)
                if stopping or time.monotonic() >= next_stats:
                    self._metrics.record_stats(self._read_stats())
                    next_stats = time.monotonic() + self._interval
            except Exception as e:  # a metrics failure must not stop serving
                self._log_error(f"pagedserve: updating metrics failed: {e!r}")
            if stopping:
                return
