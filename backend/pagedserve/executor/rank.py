"""One tensor-parallel rank's ModelRunner, in whichever process runs it, and a worker rank's
life (serve_worker_rank), the same in an mp worker process and in a Ray actor."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler_output import ModelRunnerOutput
from pagedserve.distributed import TensorParallelGroup, init_tensor_parallel
from pagedserve.executor import control
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSamplerOutput
from pagedserve.worker.sampler import SamplerOutput

logger = logging.getLogger(__name__)

# How long the ranks may take to meet and to load their parts of the model (a large checkpoint
# takes minutes); a step's collectives have distributed_timeout_seconds.
STARTUP_TIMEOUT_S = 600.0


def select_device(config: EngineConfig, rank: int) -> None:
    """Makes ``rank``'s GPU (config.devices) the calling thread's current CUDA device, before
    it allocates anything: torch.cuda's streams, events, graphs and memory readings, and
    Triton's kernels, use the current device, which is per thread and starts as GPU 0.
    Nothing to do on the CPU."""
    if config.device == "cuda":
        torch.cuda.set_device(config.devices[rank])


def join_ranks(world_size: int, rank: int, init_method: str,
               collective_timeout_s: float) -> TensorParallelGroup:
    """Joins torch.distributed (waiting up to STARTUP_TIMEOUT_S for the other ranks) and
    returns the group the model's collectives run on, whose waits end after
    ``collective_timeout_s``. Every rank calls it."""
    init_tensor_parallel(world_size, rank, init_method, timeout_s=STARTUP_TIMEOUT_S)
    if world_size == 1:
        return TensorParallelGroup()
    group = dist.new_group(timeout=datetime.timedelta(seconds=collective_timeout_s))
    return TensorParallelGroup(rank, world_size, group)


class WorkerSampler:
    """A worker rank's sampler: it samples nothing. The engine sees only rank 0's tokens, and
    they reach the workers with the next step's message (RankZeroTokens) before
    anything reads them: a token sampled at a step is first an input at the next. So a step
    needs no collective for its tokens, and an unseeded draw cannot differ between ranks.
    (With async scheduling the next step's message leaves before the tokens are known: they
    come within the step instead, SampledTokenShare.)"""

    def __call__(self, logits: torch.Tensor, metadata: object) -> SamplerOutput:
        return SamplerOutput(
            sampled=torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device))


class WorkerRejectionSampler:
    """A worker rank's verification, as WorkerSampler's sampling: it verifies nothing, and
    emits one placeholder token per row (every draft rejected) in the rejection sampler's
    shapes. Rank 0's tokens then give each row the tokens it accepted and roll its computed
    positions back by the drafts it rejected (InputBatch.overwrite_sampled)."""

    def __call__(self, draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                 target_logits: torch.Tensor, meta: object) -> RejectionSamplerOutput:
        width = int(num_draft.max()) + 1 if num_draft.numel() else 1
        rows = len(num_draft)
        token_ids = torch.full((rows, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int64,
                               device=num_draft.device)
        token_ids[:, 0] = 0
        return RejectionSamplerOutput(token_ids, torch.zeros_like(num_draft))


class SampledTokenShare:
    """With async scheduling, where the next step is sent before a step's tokens reach the
    host: each step's tokens go from rank 0's device to the workers' within the step (one
    broadcast over the tensor-parallel group, NCCL on GPUs), in place of a worker's own
    placeholders, so that a worker's next step reads them on its device as rank 0's does.
    The runner calls it with the step's tokens, its sampling rows (every rank's) and the rows
    that sampled (fewer on rank 0 where a row's sampling failed: that row gets placeholders,
    and its request ends before its next step)."""

    def __init__(self, tp: TensorParallelGroup) -> None:
        self.tp = tp

    def __call__(self, sampled: torch.Tensor, rows: np.ndarray,
                 sampled_rows: np.ndarray) -> torch.Tensor:
        if not len(rows):  # the same on every rank: a step of prompt chunks only
            return sampled
        if self.tp.rank:  # into the worker's own placeholders
            return self.tp.broadcast(sampled)
        whole = sampled
        if len(sampled_rows) != len(rows):
            whole = torch.full((len(rows), sampled.shape[1]), PLACEHOLDER_TOKEN_ID,
                               dtype=sampled.dtype, device=sampled.device)
            whole[torch.from_numpy(np.isin(rows, sampled_rows)).to(sampled.device)] = sampled
        self.tp.broadcast(whole.contiguous())
        return sampled


@dataclass
class RankZeroTokens:
    """Rank 0's tokens of a step, which the workers take with the next step's message."""

    # [n, W] in the order of the step's sampling rows: per row the tokens it emitted, then
    # PLACEHOLDER_TOKEN_ID (W = 1 unless the step verified drafts).
    tokens: np.ndarray
    # The requests they belong to, sent only when rank 0 sampled fewer rows than the workers
    # (a row whose sampling failed): otherwise they are the workers' own latest rows, in order.
    req_ids: Optional[list[str]] = None


def rank_zero_tokens(runner: ModelRunner, output: ModelRunnerOutput) -> Optional[RankZeroTokens]:
    """What rank 0 sends the workers of the step that gave ``output`` (None if none ran, or
    the workers got its tokens within the step: SampledTokenShare)."""
    if not output.req_ids or runner.share_sampled is not None:
        return None
    sampled = runner.latest_sampled
    if sampled is None:
        return None
    return RankZeroTokens(sampled[1], list(output.req_ids) if runner.failures else None)


def take_rank_zero_tokens(runner: ModelRunner, sent: Optional[RankZeroTokens]) -> None:
    """Puts rank 0's tokens of the step before in place of the placeholders a worker's runner
    recorded for it, leaving its rows as rank 0's (tokens, their count, computed positions)."""
    if sent is None:
        return
    own = runner.latest_sampled
    own_rows, own_tokens = own if own is not None else (
        np.empty(0, dtype=np.int64), np.empty((0, 1), dtype=np.int64))
    own_counts = (own_tokens >= 0).sum(axis=1)
    if sent.req_ids is None:
        rows, counts = own_rows, own_counts
    else:
        row_of = runner.batch.row_of
        rows = np.fromiter((row_of[r] for r in sent.req_ids), np.int64, len(sent.req_ids))
        index = np.full(runner.batch.max_num_reqs, -1, dtype=np.int64)
        index[own_rows] = np.arange(len(own_rows))
        if (index[rows] < 0).any():
            raise RuntimeError("tensor-parallel ranks out of step: rank 0 sampled a row this "
                               "rank did not")
        counts = own_counts[index[rows]]
    if len(rows) != len(sent.tokens):
        raise RuntimeError(f"tensor-parallel ranks out of step: rank 0 sampled "
                           f"{len(sent.tokens)} rows, this rank {len(rows)}")
    runner.batch.overwrite_sampled(rows, sent.tokens, counts)


def follow_rank_zero(runner: ModelRunner) -> None:
    """Makes ``runner`` a worker rank's: it samples and verifies nothing (its batch takes rank
    0's tokens, take_rank_zero_tokens). Build it with ``proposes=False``: rank 0's drafts
    reach it with each step."""
    runner.sampler = WorkerSampler()
    runner.returns_tokens = False
    if runner.rejection_sampler is not None:
        runner.rejection_sampler = WorkerRejectionSampler()


def build_rank_runner(config: EngineConfig, model_config: ModelConfig,
                      tp: TensorParallelGroup) -> ModelRunner:
    """``tp``'s rank of the model; a worker rank (not 0) samples and proposes nothing."""
    runner = ModelRunner(config, model_config, tp=tp, proposes=tp.rank == 0)
    if tp.rank > 0:
        follow_rank_zero(runner)
    if tp.world_size > 1 and config.async_scheduling:
        runner.share_sampled = SampledTokenShare(tp)
    return runner


def serve_commands(channel: control.ControlChannel, runner: ModelRunner, rank: int) -> None:
    """A worker rank's part of every command rank 0 sends, until it sends STOP."""
    while True:
        command, argument = channel.receive()
        if command == control.EXECUTE:
            sched, rank_zero = argument
            take_rank_zero_tokens(runner, rank_zero)
            runner.execute_model(sched)
            runner.take_failures()  # rank 0 reports them; here they only must not pile up
        elif command == control.LAUNCH:  # async scheduling: rank 0 collects, this rank later
            runner.launch(argument)
            runner.take_failures()
        elif command == control.NUM_BLOCKS:
            try:
                num_blocks = runner.determine_num_blocks()
            except ValueError:
                logger.exception("tensor-parallel rank %d: sizing the KV cache failed", rank)
                num_blocks = -1
            channel.min_over_ranks(num_blocks, STARTUP_TIMEOUT_S)
        elif command == control.INIT_KV_CACHE:
            runner.initialize_kv_cache(argument)
        elif command == control.CAPTURE_GRAPHS:
            runner.capture_graphs()
        elif command == control.TIME_FORWARDS:
            runner.time_forwards()  # rank 0's timings seed its speculation controller
        elif command == control.STOP:
            return
        else:
            raise ValueError(f"tensor-parallel rank {rank} got an unknown command {command!r}")


def serve_worker_rank(config: EngineConfig, model_config: ModelConfig, rank: int,
                      init_method: str, num_threads: int) -> None:
    """A worker rank's life once its process runs (an mp worker process or a Ray actor): join
    the ranks, build its runner, serve rank 0's commands until told to stop, leave. It runs
    on config.devices[rank] (on CUDA) with ``num_threads``, as many as rank 0 uses."""
    torch.set_num_threads(num_threads)
    select_device(config, rank)
    args = config.args
    tp = join_ranks(args.tensor_parallel_size, rank, init_method,
                    args.distributed_timeout_seconds)
    channel = control.ControlChannel(args.distributed_timeout_seconds)
    runner = build_rank_runner(config, model_config, tp)
    serve_commands(channel, runner, rank)
    dist.destroy_process_group()
