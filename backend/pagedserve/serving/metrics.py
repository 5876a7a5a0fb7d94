"""Serving metrics through Triton's custom-metrics API (``pb_utils.MetricFamily``).

Names, kinds and buckets are vllm_backend's for the metrics it has, and vLLM's
(vllm/v1/metrics/loggers.py) for the rest, so existing dashboards work. Every metric call is
an IPC round trip to the server process, so all of them happen on one reporter thread, and
none is made per token:

* the engine counts tokens and the histograms observed per token or per step (its
  ``EngineStats``); the thread writes their change once per interval, with the gauges;
* a request that ends enqueues one small record, observed once in each per-request histogram.

With speculative decoding, vLLM's spec_decode counters (drafts, draft tokens, accepted tokens,
and accepted tokens per draft position) are written the same way, from the scheduler's
cumulative counts; a model that does not speculate has none of their series, as in vLLM.

A Triton histogram takes one observation per call, so the per-token and per-step histograms
(inter-token latency, time per output token, tokens per step) are written as the series a
Prometheus histogram consists of (``_bucket{le}``, ``_sum``, ``_count``), each a counter.
Queries (``histogram_quantile``, rates of ``_sum`` over ``_count``) read them as usual.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pagedserve.engine.stats import (
    INTER_TOKEN_LATENCY_BUCKETS,
    ITERATION_TOKENS_BUCKETS,
    HistogramSnapshot,
)

# vllm_backend's buckets for the histograms it reports.
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
E2E_BUCKETS = [1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]
N_BUCKETS = [1, 2, 5, 10, 20]
# vLLM's buckets for the request phases (queue, prefill, decode, inference).
REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]
ITL_BUCKETS = list(INTER_TOKEN_LATENCY_BUCKETS)
ITERATION_BUCKETS = list(ITERATION_TOKENS_BUCKETS)
FINISH_REASONS = ("stop", "length", "abort")


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


def cache_config_info(config: Any, num_blocks: int) -> dict[str, str]:
    """The labels of vLLM's ``vllm:cache_config_info`` (a gauge set to 1) for an EngineConfig."""
    return {
        "block_size": str(config.block_size),
        "cache_dtype": str(config.dtype),
        "enable_prefix_caching": str(config.args.enable_prefix_caching),
        "gpu_memory_utilization": str(config.args.gpu_memory_utilization),
        "num_gpu_blocks": str(num_blocks),
    }


def format_le(bound: float) -> str:
    """A bucket bound as Triton's own histograms print it (``1`` for 1.0, ``0.25``)."""
    return repr(float(bound)).removesuffix(".0")


@dataclass
class FinishedRequest:
    """What one request contributes to the per-request metrics when it ends (finished or
    cancelled). Phase times are None when the request never reached the phase."""

    prompt_tokens: int
    generation_tokens: int
    n: int
    e2e_latency: float
    time_to_first_token: Optional[float]
    queue_time: Optional[float]
    prefill_time: Optional[float]
    decode_time: Optional[float]
    inference_time: Optional[float]
    finish_reasons: tuple[str, ...]  # one per completion


class CounterHistogram:
    """Owns one histogram written as counters (``name_bucket{le}``, ``name_sum``,
    ``name_count``) from the engine's cumulative snapshots: each write increments only the
    series that changed, whatever the number of observations behind the change."""

    def __init__(
        self, pb_utils: Any, families: list, name: str, description: str,
        labels: dict[str, str], bounds: list[float],
    ) -> None:
        family = pb_utils.MetricFamily
        kind = family.COUNTER
        buckets = family(name=f"{name}_bucket", description=description, kind=kind)
        total = family(name=f"{name}_sum", description=description, kind=kind)
        count = family(name=f"{name}_count", description=description, kind=kind)
        families += [buckets, total, count]  # a family lives only while referenced
        self.bounds = [float(b) for b in bounds]
        self._buckets = [
            buckets.Metric(labels={**labels, "le": le})
            for le in [format_le(b) for b in self.bounds] + ["+Inf"]
        ]
        self._sum = total.Metric(labels=labels)
        self._count = count.Metric(labels=labels)
        self._written = [0] * len(self._buckets)
        self._written_sum = 0.0

    def write(self, snapshot: HistogramSnapshot) -> None:
        """Brings the series up to ``snapshot``, whose bounds must include this one's. A
        snapshot behind what was written comes from a new engine: it counts from zero."""
        cumulative = list(itertools.accumulate(snapshot.counts))
        if cumulative[-1] < self._written[-1]:
            self._written, self._written_sum = [0] * len(self._written), 0.0
        position = {b: i for i, b in enumerate(snapshot.bounds)}
        now = [cumulative[position[b]] for b in self.bounds] + [cumulative[-1]]
        for metric, value, before in zip(self._buckets, now, self._written):
            if value > before:
                metric.increment(value - before)
        if now[-1] > self._written[-1]:
            self._count.increment(now[-1] - self._written[-1])
        if snapshot.sum > self._written_sum:
            self._sum.increment(snapshot.sum - self._written_sum)
        self._written, self._written_sum = now, snapshot.sum


class SpecDecodeCounters:
    """Owns vLLM's speculative-decoding counters for one model: drafts, draft tokens, accepted
    tokens, and accepted tokens per draft position (one series per position 0..k-1), written
    as increments from the scheduler's cumulative ``SpecDecodingStats``.

    The names are those vLLM's ``/metrics`` shows (prometheus_client adds ``_total`` to
    counters; Triton prints names as given), the descriptions vLLM's."""

    def __init__(
        self, pb_utils: Any, families: list, labels: dict[str, str], num_speculative_tokens: int,
    ) -> None:
        family = pb_utils.MetricFamily

        def counter(name: str, description: str) -> Any:
            fam = family(name=name, description=description, kind=family.COUNTER)
            families.append(fam)  # a family lives only while referenced
            return fam

        self._totals = [
            counter(name, description).Metric(labels=labels) for name, description in (
                ("vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts."),
                ("vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens."),
                ("vllm:spec_decode_num_accepted_tokens_total", "Number of accepted tokens."),
            )
        ]
        per_pos = counter("vllm:spec_decode_num_accepted_tokens_per_pos_total",
                          "Accepted tokens per draft position.")
        self._per_pos = [per_pos.Metric(labels={**labels, "position": str(position)})
                         for position in range(num_speculative_tokens)]
        self._written = [0] * (len(self._totals) + len(self._per_pos))

    def write(self, stats: Any) -> None:
        """Brings the series up to ``stats`` (a SpecDecodingStats). Counts behind what was
        written come from a new engine (after a failure): it counts from zero."""
        per_pos = list(stats.num_accepted_tokens_per_pos)[:len(self._per_pos)]
        now = [stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
               *per_pos, *[0] * (len(self._per_pos) - len(per_pos))]
        if now[0] < self._written[0]:
            self._written = [0] * len(self._written)
        for metric, value, before in zip(self._totals + self._per_pos, now, self._written):
            if value > before:
                metric.increment(value - before)
        self._written = now


class TritonMetrics:
    """Owns the metric families and the one metric of each for this model's {model, version}.
    ``num_speculative_tokens`` (the model's k) adds the spec_decode counters; None: the model
    does not speculate."""

    def __init__(
        self, pb_utils: Any, labels: dict[str, str], max_model_len: int,
        cache_info: Optional[dict[str, str]] = None,
        num_speculative_tokens: Optional[int] = None,
    ) -> None:
        family = pb_utils.MetricFamily

        def make(name: str, description: str, kind: Any, buckets: Optional[list] = None,
                 extra: Optional[dict[str, str]] = None) -> Any:
            return make_each(name, description, kind, [extra or {}], buckets)[0]

        def make_each(name: str, description: str, kind: Any, label_sets: list[dict],
                      buckets: Optional[list] = None) -> list[Any]:
            """One family, one metric per extra label set."""
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)  # a family lives only while referenced
            if buckets is None:
                return [fam.Metric(labels={**labels, **extra}) for extra in label_sets]
            return [fam.Metric(labels={**labels, **extra}, buckets=[float(b) for b in buckets])
                    for extra in label_sets]

        def counter_histogram(name: str, description: str, buckets: list) -> CounterHistogram:
            return CounterHistogram(pb_utils, self._families, name, description, labels, buckets)

        self._families: list[Any] = []
        counter, gauge, histogram = family.COUNTER, family.GAUGE, family.HISTOGRAM
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = make(
            "vllm:prompt_tokens_total", "Number of prefill tokens processed.", counter)
        self.generation_tokens = make(
            "vllm:generation_tokens_total", "Number of generation tokens processed.", counter)
        self.success = dict(zip(FINISH_REASONS, make_each(
            "vllm:request_success_total", "Count of successfully processed requests.", counter,
            [{"finished_reason": reason} for reason in FINISH_REASONS])))
        self.ttft = make(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.", histogram, TTFT_BUCKETS)
        self.tpot = counter_histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.", TPOT_BUCKETS)
        self.itl = counter_histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = make(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.", histogram, E2E_BUCKETS)
        self.queue_time = make(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", histogram,
            REQUEST_LATENCY_BUCKETS)
        self.prefill_time = make(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.", histogram,
            REQUEST_LATENCY_BUCKETS)
        self.decode_time = make(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.", histogram,
            REQUEST_LATENCY_BUCKETS)
        self.inference_time = make(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.", histogram,
            REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = make(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
            histogram, token_buckets)
        self.request_generation_tokens = make(
            "vllm:request_generation_tokens", "Number of generation tokens processed.",
            histogram, token_buckets)
        self.request_n = make(
            "vllm:request_params_n", "Histogram of the n request parameter.",
            histogram, N_BUCKETS)
        self.iteration_tokens = counter_histogram(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_BUCKETS)
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
        if cache_info:
            make("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                 gauge, extra=cache_info).set(1)
        self.spec_decode = (
            None if num_speculative_tokens is None
            else SpecDecodeCounters(pb_utils, self._families, labels, num_speculative_tokens))
        self._last_totals = (0, 0, 0, 0, 0)
        self._last_gauges: tuple = ()

    def record_request(self, r: FinishedRequest) -> None:
        """One call per per-request histogram, and one per finish reason."""
        for reason, count in Counter(r.finish_reasons).items():
            metric = self.success.get(reason)
            if metric is not None:
                metric.increment(count)
        for metric, value in (
            (self.ttft, r.time_to_first_token), (self.queue_time, r.queue_time),
            (self.prefill_time, r.prefill_time), (self.decode_time, r.decode_time),
            (self.inference_time, r.inference_time),
        ):
            if value is not None:
                metric.observe(max(value, 0.0))
        self.e2e.observe(r.e2e_latency)
        self.request_prompt_tokens.observe(r.prompt_tokens)
        self.request_generation_tokens.observe(r.generation_tokens)
        self.request_n.observe(r.n)

    def record_stats(self, stats: Any) -> None:
        """Gauges from an EngineStats snapshot; its cumulative counters and histograms become
        increments.

        Only changes are written: an idle model makes no metric calls at all. (A metric call
        that is in flight when the server goes away blocks the python stub for good.)
        """
        gauges = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        if gauges != self._last_gauges:
            for metric, value in zip((self.running, self.waiting, self.kv_usage), gauges):
                metric.set(value)
            self._last_gauges = gauges
        # Histograms before the token counters: a scrape between the two writes then sees
        # latencies ahead of the tokens they belong to, never tokens without their latencies.
        self.itl.write(stats.inter_token_latency)
        self.tpot.write(stats.inter_token_latency)  # vLLM's older name for the same series
        self.iteration_tokens.write(stats.iteration_tokens)
        if self.spec_decode is not None and stats.spec_decoding is not None:
            self.spec_decode.write(stats.spec_decoding)
        totals = (
            stats.num_preemptions_total,
            stats.prefix_cache_queries_total,
            stats.prefix_cache_hits_total,
            stats.prompt_tokens_total,
            stats.generation_tokens_total,
        )
        counters = (self.preemptions, self.prefix_queries, self.prefix_hits,
                    self.prompt_tokens, self.generation_tokens)
        for metric, now, before in zip(counters, totals, self._last_totals):
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
