"""The synchronous engine: requests in, one step at a time, RequestOutputs out."""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from pagedserve.config import EngineArgs, resolve_engine_config
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.engine.fault_injection import arm_fault_injection
from pagedserve.engine.input_processor import InputProcessor, PromptType
from pagedserve.engine.loggers import RequestLogger, StatLogger, make_visible
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.stats import EngineCounters, HistogramSnapshot
from pagedserve.errors import EngineDeadError, RequestError
from pagedserve.executor.base import Executor
from pagedserve.executor.factory import make_executor
from pagedserve.executor.rank import select_device
from pagedserve.models.hub import resolve_checkpoint
from pagedserve.models.model_config import ModelConfig
from pagedserve.models.registry import model_class
from pagedserve.outputs import RequestOutput
from pagedserve.placement import UNPLACED, InstancePlacement
from pagedserve.sampling_params import SamplingParams
from pagedserve.spec_decode.controller import SpecDecodingStats, SpeculationController
from pagedserve.spec_decode.costs import ProposerCostModel, StepCostModel
from pagedserve.tokenizer.tokenizer import load_tokenizer
from pagedserve.worker.model_runner import LaunchedStep

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine's load; counters and histograms are cumulative since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks in use
    kv_waste: float  # reserved-but-empty slots over reserved slots
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    prompt_tokens_total: int  # counted when a request produces its first token
    generation_tokens_total: int
    iteration_tokens: HistogramSnapshot  # tokens computed per step
    inter_token_latency: HistogramSnapshot  # seconds, per token after a completion's first
    # Speculative decoding's counts (vLLM's spec_decode metrics); None without it.
    spec_decoding: Optional[SpecDecodingStats] = None


def _reclaim_frozen_objects() -> None:
    """Lets the collector see what earlier engines froze, so that one deleted since (its
    model, its KV cache: cycles that only a collection frees) is freed before this one
    measures the memory left."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


def _freeze_startup_objects() -> None:
    """Moves everything alive after start-up (model, tokenizer, libraries) out of the garbage
    collector's sight: a full collection over them took 150 ms in the middle of a stream.
    They are handed back at exit so that interpreter shutdown cleans up as usual."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


_unfreeze_registered = False


class LLMEngine:
    """Owns the tokenizer, scheduler, executor (the model's ranks) and output processor.

    ``step()`` reads top-down: schedule, run the model, update requests, make outputs.
    ``placement`` says which GPUs a Triton instance's ranks use (pagedserve.placement).
    """

    def __init__(self, args: EngineArgs,
                 placement: InstancePlacement = UNPLACED) -> None:
        _reclaim_frozen_objects()
        model_path = resolve_checkpoint(
            args.model, revision=args.revision, download_dir=args.download_dir
        )
        model_config = ModelConfig.from_pretrained(
            model_path, args.trust_remote_code, args.quantization
        )
        model_class(model_config.architecture)  # unsupported architectures fail before loading
        checkpoint_dtype = str(model_config.checkpoint_dtype).removeprefix("torch.")
        self.config = resolve_engine_config(
            args,
            model_config.max_position_embeddings,
            checkpoint_dtype,
            sliding_window=model_config.sliding_window,
            cuda_device_count=torch.cuda.device_count(),  # 0 without CUDA
            quantized=model_config.quant_config is not None,
            placement=placement,
        )
        # Fails naming tensor_parallel_size where heads or KV heads do not divide.
        model_config = model_config.with_tensor_parallel(args.tensor_parallel_size)
        self.model_config = model_config
        tokenizer_path = model_path if args.tokenizer is None else resolve_checkpoint(
            args.tokenizer, what="tokenizer", revision=args.tokenizer_revision,
            download_dir=args.download_dir,
        )
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
        select_device(self.config, 0)  # rank 0 runs here; before anything is on a GPU
        self.executor: Executor = make_executor(self.config, model_config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_kv_cache(num_blocks)
            self.executor.capture_graphs()
        except BaseException:
            self.executor.shutdown()
            raise
        self.runner = self.executor.runner  # rank 0's, in this process
        self.kv_manager = KVCacheManager(
            num_blocks, self.config.block_size, args.enable_prefix_caching
        )
        self.speculation = self._speculation_controller()
        self.scheduler = Scheduler(
            self.kv_manager,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_chunked_prefill=args.enable_chunked_prefill,
            speculation=self.speculation,
        )
        self.request_logger = RequestLogger() if args.log_requests else None
        self.counters = EngineCounters()
        self.output_processor = OutputProcessor(
            self.tokenizer, self.request_logger, self.counters
        )
        self.stat_logger = None if args.disable_log_stats else StatLogger(self.get_stats)
        if self.request_logger or self.stat_logger:
            make_visible()
        self.input_processor = InputProcessor(
            self.tokenizer,
            model_config.vocab_size,
            self.config.max_model_len,
            self.config.max_num_seqs,
            args.max_logprobs,
        )
        eos = model_config.eos_token_ids or (
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        )
        self.eos_token_ids = frozenset(eos)
        self._request_counter = itertools.count()
        self._in_flight: Optional[LaunchedStep] = None  # launched, not yet collected
        # Requests that failed on their own since the last take_request_errors().
        self.request_errors: list[RequestError] = []
        # Set when a step failed in a way no request explains; the engine is then unusable.
        self.dead_error: Optional[EngineDeadError] = None
        arm_fault_injection(self.runner)
        _freeze_startup_objects()

    def _speculation_controller(self) -> Optional[SpeculationController]:
        spec = self.config.speculative
        if spec is None:
            return None
        drafter = self.runner.paged_proposer  # a drafting step's price, before measured
        cost, verify_cost = StepCostModel(), StepCostModel()
        propose_cost = ProposerCostModel(0 if drafter is None else drafter.EXTRA_FORWARDS)
        if spec.adaptive:
            # The best of two rounds: a step size timed while the host was busy with other
            # work made the next size look nearly free.
            rounds = [self.executor.time_forwards() for _ in range(2)]
            for timings in zip(*rounds):
                num_tokens, seconds = timings[0][0], min(seconds for _, seconds in timings)
                cost.seed(num_tokens, seconds)
                verify_cost.seed(num_tokens, seconds)
            if drafter is not None:
                sizes = [1 << i for i in range(self.config.max_num_seqs.bit_length())]
                for num_requests, seconds in drafter.time_steps(sizes):
                    propose_cost.seed(num_requests, seconds)
        return SpeculationController(
            spec.num_speculative_tokens, spec.adaptive, spec.disable_by_batch_size, cost,
            propose_cost, verify_cost,
        )

    # ---- requests ------------------------------------------------------------------------

    def next_request_id(self) -> str:
        return str(next(self._request_counter))

    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """Validates a prompt and returns (text or None, token ids)."""
        return self.input_processor.process_prompt(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
    ) -> None:
        """Validates and queues a request; bad input raises ValueError and changes nothing."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        params = self.input_processor.process_params(
            params if params is not None else SamplingParams()
        )
        text, token_ids = self.process_prompt(prompt)
        if self.request_logger is not None:
            self.request_logger.log_added(request_id, text, token_ids, params)
        arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        salt = request_id if params.n > 1 and not self.config.args.enable_prefix_caching else None
        children = [
            Request(
                request_id if params.n == 1 else f"{request_id}#{i}",
                token_ids,
                params,
                self.eos_token_ids,
                self.config.max_model_len,
                parent_id=request_id,
                index=i,
                arrival_time=arrival_time,
                cache_salt=salt,
            )
            for i in range(params.n)
        ]
        self.output_processor.add_request(
            request_id, text, token_ids, params, children, arrival_time
        )
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Stops user requests at once and frees their blocks; returns their final outputs."""
        outputs = []
        for rid in request_ids:
            state = self.output_processor.states.get(rid)
            if state is None:
                continue
            self.scheduler.finish_requests(
                [c.request.request_id for c in state.completions],
                RequestStatus.FINISHED_ABORTED,
            )
            output = self.output_processor.abort(rid)
            if output is not None:
                outputs.append(output)
        return outputs

    def reset_prefix_cache(self) -> None:
        self.kv_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and runs one step and returns the outputs it produced.

        With async scheduling the step is only launched; the outputs returned are the
        previous step's, processed on the host while the device runs this one.

        A request whose own work fails ends without an output; its error waits in
        ``request_errors``. Any other exception marks the engine dead (``dead_error``): it is
        re-raised, and every later step raises EngineDeadError."""
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        try:  # free unless it raises
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.total_num_scheduled_tokens:
                self.counters.iteration_tokens.observe(
                    scheduler_output.total_num_scheduled_tokens
                )
            if not self.config.async_scheduling:
                start = time.perf_counter()
                runner_output = self.executor.execute_model(scheduler_output)
                if self.speculation is not None:
                    self._observe_speculation(scheduler_output, time.perf_counter() - start)
                if self.executor.failures:
                    self._fail_runner_requests()
                return self._update(runner_output)
            launched = self.executor.launch(scheduler_output)
            if self.executor.failures:
                self._fail_runner_requests()
            previous, self._in_flight = self._in_flight, launched
            return [] if previous is None else self._update(self.executor.collect(previous))
        except BaseException as e:
            self.dead_error = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            raise

    def _observe_speculation(self, sched: SchedulerOutput, seconds: float) -> None:
        """Tells the speculation controller what the step cost, the proposer's share apart
        (proposing is priced on its own). Only decode steps (with or without drafts) feed the
        step cost model: a prompt chunk's tokens cost another price."""
        proposals = self.executor.spec_timing.take_proposals()
        propose_seconds = 0.0
        for p in proposals:
            self.speculation.observe_proposal(p.num_requests, p.num_with_drafts, p.k,
                                              p.seconds)
            propose_seconds += p.seconds
        if sched.num_scheduled_tokens and not sched.scheduled_new_reqs and max(
            sched.num_scheduled_tokens.values()
        ) <= 1 + self.config.speculative.num_speculative_tokens:
            self.speculation.observe_step(sched.total_num_scheduled_tokens,
                                          seconds - propose_seconds,
                                          verified=bool(sched.scheduled_spec_decode_tokens),
                                          num_requests=len(sched.num_scheduled_tokens))

    def _update(self, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        core_outputs = self.scheduler.update_from_output(runner_output)
        outputs, stopped, failed = self.output_processor.process(core_outputs)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.stat_logger is not None:
            self.stat_logger.record()
        for core_ids, error in failed:
            self._end_failed(core_ids, error)
        return outputs

    def _fail_runner_requests(self) -> None:
        for core_id, error in self.executor.take_failures().items():
            request = self.scheduler.requests.get(core_id)
            if request is None:
                continue  # already finished
            state = self.output_processor.drop(request.parent_id)
            if state is None:
                continue  # a sibling completion failed first
            core_ids = [c.request.request_id for c in state.completions]
            self._end_failed(core_ids, error.for_request(request.parent_id))

    def _end_failed(self, core_ids: list[str], error: RequestError) -> None:
        """Ends a request that failed on its own: frees its blocks and keeps its error."""
        trace = "".join(traceback.format_exception(error.__cause__))
        logger.error("pagedserve: %s\n%s", error, trace)  # text: a record would keep the frames
        self.scheduler.finish_requests(core_ids, RequestStatus.FINISHED_ABORTED)
        self.request_errors.append(error)

    def take_request_errors(self) -> list[RequestError]:
        """The errors of the requests that failed on their own since the last call."""
        errors, self.request_errors = self.request_errors, []
        return errors

    def shutdown(self) -> None:
        """Stops the model's other ranks (worker processes), if any; idempotent. The engine
        cannot step afterwards."""
        if self.dead_error is None:
            self.dead_error = EngineDeadError("the engine was shut down")
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        stats = self.scheduler.stats()
        kv = stats.kv
        counters = self.counters
        return EngineStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=kv.usage,
            kv_waste=kv.kv_waste,
            num_kv_blocks=kv.num_blocks,
            num_free_kv_blocks=kv.num_free_blocks,
            num_preemptions_total=stats.num_preemptions_total,
            prefix_cache_queries_total=kv.prefix_cache_queries,
            prefix_cache_hits_total=kv.prefix_cache_hits,
            prompt_tokens_total=counters.prompt_tokens,
            generation_tokens_total=counters.generation_tokens,
            iteration_tokens=counters.iteration_tokens.snapshot(),
            inter_token_latency=counters.inter_token_latency.snapshot(),
            spec_decoding=stats.spec_decoding,
        )
