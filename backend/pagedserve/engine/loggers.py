"""What the engine writes to its log when asked: each request as it arrives and finishes
(``enable_log_requests``), and its throughput and load every few seconds (unless
``disable_log_stats``), in vLLM's words."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Optional

from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve.engine")

_MAX_LOG_CHARS = 256  # of the prompt, and of its token ids, per line


def make_visible() -> None:
    """INFO lines of the engine reach stderr (the server log under Triton) even where nobody
    configured logging, as vLLM's own logger does; a configured handler is left in charge."""
    logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_LOG_CHARS else text[:_MAX_LOG_CHARS] + "..."


class RequestLogger:
    """Logs one INFO line when a request is added and one when it finishes."""

    def log_added(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        logger.info(
            "Received request %s: prompt: %s, params: %s, prompt_token_ids: %s",
            request_id,
            _clip(repr(prompt)),
            params,
            _clip(str(prompt_token_ids)),
        )

    def log_finished(self, output: RequestOutput) -> None:
        logger.info(
            "Finished request %s: finish_reason: %s, prompt tokens: %d, generated tokens: %d",
            output.request_id,
            ",".join(str(c.finish_reason) for c in output.outputs),
            len(output.prompt_token_ids),
            output.metrics.num_generation_tokens,
        )


class StatLogger:
    """Every ``interval_s``, while the engine works, logs the prompt and generation
    throughput since the last line, the running and waiting requests, the KV cache usage and
    the prefix cache hit rate (vLLM's LoggingStatLogger, one line per interval)."""

    def __init__(self, get_stats: Callable[[], Any], interval_s: float = 10.0) -> None:
        # get_stats: the engine's EngineStats snapshot (its token counters included), taken
        # once per line.
        self._get_stats = get_stats
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last_prompt = self._last_generation = 0
        self._last_queries = self._last_hits = 0

    def record(self) -> None:
        """Called once per step; logs when the interval is over."""
        now = time.monotonic()
        if now - self._last_time >= self.interval_s:
            self.log(now)

    def log(self, now: float) -> None:
        elapsed = max(now - self._last_time, 1e-9)
        stats = self._get_stats()
        prompt = stats.prompt_tokens_total - self._last_prompt
        generation = stats.generation_tokens_total - self._last_generation
        queries = stats.prefix_cache_queries_total - self._last_queries
        hits = stats.prefix_cache_hits_total - self._last_hits
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            prompt / elapsed,
            generation / elapsed,
            stats.num_running,
            stats.num_waiting,
            100.0 * stats.kv_cache_usage,
            100.0 * hits / queries if queries else 0.0,
        )
        self._last_time = now
        self._last_prompt = stats.prompt_tokens_total
        self._last_generation = stats.generation_tokens_total
        self._last_queries = stats.prefix_cache_queries_total
        self._last_hits = stats.prefix_cache_hits_total
