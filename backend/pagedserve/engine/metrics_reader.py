"""The engine's figures as vLLM's ``LLM.get_metrics()`` returns them (vllm/v1/metrics/reader.py):
a list of Counter, Gauge, Histogram and Vector objects, named as vLLM's reader names them.

vLLM reads them from its Prometheus registry, where a counter's name drops prometheus_client's
``_total`` (``vllm:prompt_tokens``, ``vllm:spec_decode_num_drafts``); here they come from one
EngineStats snapshot. Only what the engine counts is here: the per-request histograms (time to
first token, end-to-end latency, ...) are kept by the Triton backend, not the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pagedserve.engine.stats import HistogramSnapshot

if TYPE_CHECKING:
    from pagedserve.engine.llm_engine import EngineStats


@dataclass
class Metric:
    """One series: its name and its labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A count that only grows (cumulative since the engine started)."""

    value: int


@dataclass
class Vector(Metric):
    """Counters by position: ``vllm:spec_decode_num_accepted_tokens_per_pos`` (draft
    position j's accepted tokens at index j), as vLLM's reader gives it."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A value that goes up and down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations by bucket: ``buckets`` maps each upper bound (``"0.01"``, ..., ``"+Inf"``)
    to the observations at or below it (cumulative, as Prometheus counts them)."""

    count: int
    sum: float
    buckets: dict[str, int]


def _histogram(name: str, labels: dict[str, str], snapshot: HistogramSnapshot) -> Histogram:
    buckets, running = {}, 0
    for bound, count in zip([*map(str, snapshot.bounds), "+Inf"], snapshot.counts):
        running += count
        buckets[bound] = running
    return Histogram(name, dict(labels), running, snapshot.sum, buckets)


def metrics_from_stats(
    stats: EngineStats, model_name: str, num_speculative_tokens: Optional[int] = None
) -> list[Metric]:
    """An EngineStats snapshot as vLLM's metric objects, labelled ``{model_name, engine}``
    as vLLM labels them. The spec_decode ones are there when the engine speculates
    (``num_speculative_tokens`` is its k), with one per-position value per draft position."""
    labels = {"model_name": model_name, "engine": "0"}
    metrics: list[Metric] = [
        Gauge("vllm:num_requests_running", dict(labels), stats.num_running),
        Gauge("vllm:num_requests_waiting", dict(labels), stats.num_waiting),
        Gauge("vllm:kv_cache_usage_perc", dict(labels), stats.kv_cache_usage),
    ]
    metrics += [Counter(name, dict(labels), value) for name, value in (
        ("vllm:num_preemptions", stats.num_preemptions_total),
        ("vllm:prefix_cache_queries", stats.prefix_cache_queries_total),
        ("vllm:prefix_cache_hits", stats.prefix_cache_hits_total),
        ("vllm:prompt_tokens", stats.prompt_tokens_total),
        ("vllm:generation_tokens", stats.generation_tokens_total),
    )]
    metrics.append(_histogram("vllm:iteration_tokens_total", labels, stats.iteration_tokens))
    metrics.append(_histogram("vllm:inter_token_latency_seconds", labels,
                              stats.inter_token_latency))
    spec = stats.spec_decoding
    if num_speculative_tokens is not None and spec is not None:
        metrics += [Counter(name, dict(labels), value) for name, value in (
            ("vllm:spec_decode_num_drafts", spec.num_drafts),
            ("vllm:spec_decode_num_draft_tokens", spec.num_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens", spec.num_accepted_tokens),
        )]
        per_pos = list(spec.num_accepted_tokens_per_pos)[:num_speculative_tokens]
        per_pos += [0] * (num_speculative_tokens - len(per_pos))
        metrics.append(Vector("vllm:spec_decode_num_accepted_tokens_per_pos", dict(labels),
                              per_pos))
    return metrics
