"""The pagedserve Triton backend, a Python-based backend: <backend-dir>/pagedserve/model.py.

A model whose config.pbtxt says ``backend: "pagedserve"`` gets vllm_backend's tensor contract
(plus ``input_ids``/``output_ids``), served by pagedserve's AsyncLLMEngine built from
``<model>/<version>/model.json``. Threads, each with one job:

* Triton's thread calls ``execute``, which hands each request to the event loop and returns;
* the event loop thread runs one coroutine per request (``serving/handler.py``);
* the engine's own thread steps the model (inside AsyncLLMEngine);
* the responder thread sends responses and polls clients for cancellation;
* the metrics thread writes Triton custom metrics;
* a watchdog process ends the stub if the server dies without unloading it (watchdog.py);
* after an engine failure, a recovery thread unloads the model or rebuilds the engine
  (serving/recovery.py).

This file only imports ``pagedserve`` by absolute name, so it works copied anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

# The python backend's stub starts its interpreter with -E, which leaves PYTHONPATH off
# sys.path; honour it as python does, so that a server started from a checkout with
# PYTHONPATH=backend:kernels serves that checkout's pagedserve (not another installed one).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and p not in sys.path]

import triton_python_backend_utils as pb_utils

from pagedserve.config import EngineArgs
from pagedserve.placement import InstancePlacement
from pagedserve.serving.abort_channel import AbortRegistry, abort_target
from pagedserve.serving.contract import INPUTS, OUTPUTS
from pagedserve.serving.event_loop import EventLoopThread
from pagedserve.serving.handler import UNLOADING, RequestHandler
from pagedserve.serving.metrics import MetricsReporter, TritonMetrics, cache_config_info
from pagedserve.serving.recovery import (
    EngineRecovery,
    choose_recovery,
    request_reload,
    supervisor_dir,
)
from pagedserve.serving.responder import Inflight, Responder
from pagedserve.serving.watchdog import OrphanWatchdog

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import AsyncLLMEngine

# The engine shares the CPU with tritonserver, this stub's response threads and often the
# clients. OpenMP threads that spin after every parallel region take that CPU away from them
# (2 cores, cpu-small workload, 16 streams: served throughput 83% -> 91% of in-process). Set
# before torch loads libgomp, hence the engine's import in initialize(). A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ENGINE_ARGS_FILE = "model.json"
# How long finalize() lets in-flight requests finish before aborting them. (Triton 2.51 already
# waits for a model's in-flight requests before unloading it; this guards the other cases.)
FINALIZE_GRACE_S = 5.0


def _totals(stats: Any) -> dict[str, int]:
    """The cumulative counters of an EngineStats."""
    return {name: getattr(stats, name) for name in (
        "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
        "prompt_tokens_total", "generation_tokens_total")}


def _parameter(model_config: dict, name: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(name, {}).get("string_value")
    return default if value in (None, "") else value


class TritonPythonModel:
    """Owns the engine, the event loop, the responder, and the metrics of one llm model."""

    @classmethod
    def auto_complete_config(cls, auto_complete_model_config: Any) -> Any:
        config = auto_complete_model_config.as_dict()
        have_inputs = {i["name"] for i in config.get("input", [])}
        have_outputs = {o["name"] for o in config.get("output", [])}
        for spec in INPUTS:
            if spec["name"] not in have_inputs:
                auto_complete_model_config.add_input(dict(spec))
        for spec in OUTPUTS:
            if spec["name"] not in have_outputs:
                auto_complete_model_config.add_output(dict(spec))
        # Responses stream out as tokens arrive, and the engine batches on its own.
        auto_complete_model_config.set_model_transaction_policy(dict(decoupled=True))
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        from pagedserve.engine.async_engine import AsyncLLMEngine  # torch: see OMP_WAIT_POLICY

        self.model_config = json.loads(args["model_config"])
        name = self.model_config["name"]
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise ValueError(
                f"model '{name}': the pagedserve backend streams, so its config.pbtxt must not "
                "set model_transaction_policy { decoupled: false }"
            )
        path = os.path.join(args["model_repository"], args["model_version"], ENGINE_ARGS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"model '{name}': {path} is missing; it holds the engine arguments, at least "
                '{"model": "<checkpoint directory>"}'
            )
        try:
            engine_args = EngineArgs.from_json_file(path)
        except ValueError as e:
            raise ValueError(f"model '{name}': {path}: {e}") from None
        # Which GPUs this instance's ranks use (placement.py: KIND_GPU's device id, or
        # GPU_DEVICE_IDS); more GPUs than exist fails the engine's build, and so the load.
        try:
            placement = InstancePlacement.from_triton_args(args)
        except ValueError as e:
            raise ValueError(f"model '{name}': instance {args.get('model_instance_name')}: "
                             f"{e}") from None
        self.logger = pb_utils.Logger
        self.watchdog = OrphanWatchdog()
        self.engine: Optional[AsyncLLMEngine] = None  # set by the recovery's install
        self._totals_offset: tuple[int, ...] = (0,) * 5  # counters of engines before it
        self.handler: Optional[RequestHandler] = None
        self._accepting = True
        self.aborts = AbortRegistry()  # requests from tensorrt_llm_bls, by Triton request id
        self.loop = EventLoopThread()
        self.responder = Responder(pb_utils, self._on_client_cancelled, self.logger.log_error)
        # vllm_backend's switch: an unhealthy engine unloads the model (see recovery.py).
        health_check = _parameter(self.model_config, "ENABLE_VLLM_HEALTH_CHECK", "false")
        self.recovery = EngineRecovery(
            choose_recovery(health_check.lower() == "true", supervisor_dir() is not None),
            build=lambda on_dead: AsyncLLMEngine(engine_args, on_dead, placement),
            install=self._install_engine,
            wait_drained=self.responder.wait_drained,
            unload=self._unload_self,
            log_info=self.logger.log_info,
            log_error=self.logger.log_error,
        )
        self._max_model_len = self.engine.max_model_len
        self._last_stats = self.engine.get_stats()
        self.reporter = self._start_metrics(args, engine_args)
        self.handler = RequestHandler(
            self.engine,
            pb_utils,
            self.responder,
            self.reporter.request_finished if self.reporter is not None else None,
            self.logger.log_error,
        )
        config = self.engine.engine.config
        where = (", ".join(config.rank_device(r) for r in range(len(config.devices)))
                 or config.device)
        self.logger.log_info(
            f"pagedserve: model '{name}' serves {engine_args.model} on {where} "
            f"(after an engine failure: {self.recovery.recovery.value})"
        )

    def _install_engine(self, engine: Optional[AsyncLLMEngine]) -> None:
        """The engine requests go to; None while a failed one is being replaced."""
        if engine is None and self.engine is not None:
            # Nothing runs any more; the counters go on from here with the next engine.
            last = self._last_stats
            self._last_stats = dataclasses.replace(
                last, num_running=0, num_waiting=0, kv_cache_usage=0.0, kv_waste=0.0,
                num_free_kv_blocks=last.num_kv_blocks,
            )
            self._totals_offset = tuple(_totals(last).values())
        self.engine = engine
        if self.handler is not None:
            self.handler.engine = engine

    def _read_stats(self) -> Any:
        """The engine's stats, with counters that keep counting across engine restarts."""
        engine = self.engine
        if engine is not None:
            stats = engine.get_stats()
            if any(self._totals_offset):
                stats = dataclasses.replace(stats, **{
                    name: value + offset for (name, value), offset
                    in zip(_totals(stats).items(), self._totals_offset)
                })
            self._last_stats = stats
        return self._last_stats

    def _unload_self(self, reason: str) -> None:
        """Asks Triton to unload this model (explicit model control only; raises otherwise);
        under ``pagedserve serve``, asks the supervisor to load it again."""
        name = self.model_config["name"]
        directory = supervisor_dir()
        if directory is not None:
            request_reload(directory, name, reason)
        try:
            pb_utils.unload_model(name)
        except Exception:
            if directory is not None:
                request_reload(directory, name, reason, cancel=True)
            raise
        self.logger.log_warn(f"pagedserve: model '{name}' asked Triton to unload it")

    def _start_metrics(self, args: dict, engine_args: EngineArgs) -> Optional[MetricsReporter]:
        if _parameter(self.model_config, "REPORT_CUSTOM_METRICS", "true").lower() != "true":
            return None
        labels = {"model": args["model_name"], "version": args["model_version"]}
        try:
            config = self.engine.engine.config
            cache_info = cache_config_info(config, self.engine.get_stats().num_kv_blocks)
            speculative = config.speculative
            metrics = TritonMetrics(
                pb_utils, labels, self._max_model_len, cache_info,
                None if speculative is None else speculative.num_speculative_tokens,
            )
        except pb_utils.TritonModelException as e:
            if "metrics not supported" in str(e):  # the server runs with --allow-metrics=false
                self.logger.log_info("pagedserve: metrics are disabled on this server")
                return None
            raise
        interval = float(_parameter(self.model_config, "metrics_interval_s", "1.0"))
        return MetricsReporter(metrics, self._read_stats, interval, self.logger.log_error)

    def _on_client_cancelled(self, state: Inflight) -> None:
        self.logger.log_verbose(f"pagedserve: {state.request_id} cancelled by the client")
        self.loop.call(self.handler.cancel, state)

    def _abort(self, target: str, request: Any) -> None:
        """A BLS model's request to abort the llm request it sent with id ``target``
        (serving/abort_channel.py): cancelled as if its client had; the answer is empty."""
        state = self.aborts.pop(target)
        if state is not None:
            self._on_client_cancelled(state)
        request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list) -> None:
        now = time.monotonic()
        unavailable = self.recovery.unavailable
        for request in requests:
            target = abort_target(request.parameters())
            if target is not None:
                self._abort(target, request)
                continue
            state = self.handler.new_state(request, now)
            state.bls_caller = self.aborts.register(request.request_id(), state)
            if not self._accepting:
                self.responder.send_error(state, *UNLOADING)
                continue
            if unavailable is not None:
                self.responder.send_error(state, unavailable, "UNAVAILABLE")
                continue
            self.loop.submit(self.handler.serve(state, request))
        return None

    def finalize(self) -> None:
        self._accepting = False
        engine = self.recovery.close()  # waits for an engine restart under way
        if not self.responder.wait_drained(FINALIZE_GRACE_S):
            remaining = self.responder.inflight()
            self.logger.log_warn(f"pagedserve: aborting {len(remaining)} unfinished request(s)")
            for state in remaining:
                self.loop.call(self.handler.cancel, state, UNLOADING)
            self.responder.wait_drained(FINALIZE_GRACE_S)
        self.loop.stop()
        self.responder.stop()
        if self.reporter is not None:
            self.reporter.stop()
        if engine is not None:
            engine.shutdown()
        self.watchdog.stop()
        self.logger.log_info(f"pagedserve: model '{self.model_config['name']}' shut down")
