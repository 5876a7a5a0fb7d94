"""Runs the model for one scheduled step: flatten the batch, forward, sample."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.layer import (
    allocate_kv_caches,
    kv_cache_block_bytes,
    kv_cache_torch_dtype,
)
from pagedserve.attention.selector import get_attention_backend
from pagedserve.config import EngineConfig
from pagedserve.core.scheduler_output import (
    EMPTY_RUNNER_OUTPUT,
    ModelRunnerOutput,
    SchedulerOutput,
)
from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup
from pagedserve.errors import RequestError, RequestParamsError
from pagedserve.models.eagle3 import split_aux
from pagedserve.models.loader import load_model
from pagedserve.models.model_config import ModelConfig, parse_dtype
from pagedserve.spec_decode.draft_model import DraftModelProposer
from pagedserve.spec_decode.eagle3_proposer import Eagle3Proposer, StepFeatures
from pagedserve.spec_decode.proposer import NgramBatchProposer, Proposer
from pagedserve.worker.cuda_graphs import CudaGraphRunner, capture_sizes, graphs_unusable
from pagedserve.worker.draft_graphs import capture_draft_graphs
from pagedserve.worker.dummy_forwards import profile_run, time_forwards
from pagedserve.worker.host_memory import keep_large_buffers_mapped
from pagedserve.worker.input_batch import InputBatch
from pagedserve.worker.isolation import sample_isolating
from pagedserve.worker.memory_profiling import DeviceMemory, kv_cache_budget
from pagedserve.worker.prompt_logprobs import (
    PromptLogprobsPlan,
    PromptLogprobsTensors,
    compute_prompt_logprobs,
)
from pagedserve.worker.rejection_sampler import RejectionSampler
from pagedserve.worker.sampler import Sampler, SamplerOutput, logprobs_lists
from pagedserve.worker.spec_timing import SpecTiming
from pagedserve.worker.step_buffers import StepBuffers
from pagedserve.worker.verification import DraftLayout, first_positions, layout_drafts, verify
from pagedserve_kernels.reference import is_fp8

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on the CPU


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device; ``collect`` waits for its
    tokens. Until then the tokens exist only on the device (``sampled``), where the next step
    takes its decode inputs from."""

    req_ids: list[str]
    rows: np.ndarray  # batch rows that sampled, in output order
    positions: np.ndarray  # where each row's first new token goes in its row
    serials: np.ndarray  # the rows' serial numbers (see InputBatch.serial)
    # [n, W] int64 on the device: each row's emitted tokens, PLACEHOLDER_TOKEN_ID after them
    # (W = 1 without speculation, where a row emits exactly one).
    sampled: torch.Tensor
    sampled_host: torch.Tensor  # its copy to the host, in flight until ``done``
    logprobs_host: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    num_logprobs: np.ndarray  # per sampled row, -1 for none
    done: Optional[torch.cuda.Event]  # None on the CPU, where all of it has already run
    prompt_logprobs: Optional[PromptLogprobsTensors] = None  # host copies, in flight too
    num_drafts: Optional[np.ndarray] = None  # per row, the drafts it verified (speculation)
    num_lookahead: int = 0  # drafts to propose per row once the tokens are known
    features: Optional[StepFeatures] = None  # the target's features, for an EAGLE-3 head
    output: Optional[ModelRunnerOutput] = None  # set by collect


@dataclass
class ForwardInputs:
    """The flattened batch of one step, on the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows whose hidden state is sampled (1 + k per request)
    graph_size: Optional[int] = None  # the CUDA graph that runs this step, if any


class ModelRunner:
    """Owns the model (``tp``'s rank of it), its KV caches, the persistent InputBatch and the
    Sampler."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig,
                 tp: TensorParallelGroup = SINGLE_RANK, proposes: bool = True) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.rank_device(tp.rank))
        # The device before this engine loads anything: what other processes already hold.
        self._memory_at_start: Optional[DeviceMemory] = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self._memory_at_start = DeviceMemory.read()
        else:  # activations live in host memory: keep the large ones from pinning the heap
            keep_large_buffers_mapped()
        self.dtype = parse_dtype(config.dtype)
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        torch.manual_seed(config.args.seed)
        self.attn: AttentionBackend = get_attention_backend(
            config.args.attention_backend,
            self.device,
            num_heads=model_config.heads_per_rank,
            num_kv_heads=model_config.kv_heads_per_rank,
            head_dim=model_config.head_dim,
            scale=model_config.head_dim ** -0.5,
            block_size=config.block_size,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        if model_config.kv_cache_scheme is not None and not is_fp8(self.kv_cache_dtype):
            logger.info("the checkpoint carries fp8 KV-cache scales (kv_cache_scheme); they are "
                        "used with kv_cache_dtype fp8, not with %s", config.kv_cache_dtype)
        self.model = load_model(model_config, self.dtype, self.device, self.attn,
                                model_config.quant_config, tp=tp)
        self.vocab_size = model_config.vocab_size
        self.batch = InputBatch(
            config.max_num_seqs, config.max_model_len, config.max_blocks_per_req, self.vocab_size
        )
        self.sampler = Sampler()
        self.speculative = config.speculative
        self.rejection_sampler = RejectionSampler() if self.speculative is not None else None
        # False on a tensor-parallel worker (follow_rank_zero): its tokens are placeholders,
        # which nobody reads the logprobs of.
        self.returns_tokens = True
        # With async scheduling and several ranks: puts rank 0's tokens of each step in place
        # of a worker's own, on the device, within the step (executor/rank.SampledTokenShare).
        self.share_sampled: Optional[Callable[..., torch.Tensor]] = None
        self.proposer: Optional[Proposer] = None
        # A draft model's or EAGLE-3 head's KV cache shares the target's block ids (and
        # budget).
        self.draft_model: Optional[DraftModelProposer] = None
        self.eagle3: Optional[Eagle3Proposer] = None
        # Without ``proposes`` (a tensor-parallel worker) no proposer: the step brings rank
        # 0's drafts, and a draft model runs unsharded on rank 0 alone.
        method = None if self.speculative is None or not proposes else self.speculative.method
        if method == "ngram":
            self.proposer = NgramBatchProposer(self.speculative.ngram)
        elif method == "draft_model":
            self.proposer = self.draft_model = DraftModelProposer(
                config, model_config, self.dtype, self.kv_cache_dtype, self.device
            )
        elif method == "eagle3":  # from here on the target's forward returns (hidden, aux)
            self.proposer = self.eagle3 = Eagle3Proposer(
                config, model_config, self.model, self.dtype, self.kv_cache_dtype, self.device
            )
        self.paged_proposer = self.draft_model or self.eagle3
        self.spec_timing = SpecTiming()
        uses_graphs = graphs_unusable(self.device, config.args.enforce_eager, self.attn) is None
        max_graph = capture_sizes(config.max_num_seqs)[-1] if uses_graphs else 0
        graph_tokens = max_graph * (
            1 if self.speculative is None else 1 + self.speculative.num_speculative_tokens)
        self.buffers = StepBuffers(
            max(config.max_num_batched_tokens, graph_tokens),
            max(config.max_num_seqs, max_graph),
            # With drafts a request samples at up to 1 + k positions.
            config.max_num_batched_tokens if self.speculative is not None else 0,
            config.max_blocks_per_req,
            self.device,
        )
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: Optional[CudaGraphRunner] = None  # set up by capture_graphs()
        # The last two launched steps; only the latest may still be uncollected when the
        # next one is prepared.
        self._latest: Optional[LaunchedStep] = None
        self._older: Optional[LaunchedStep] = None
        # Requests whose own work failed in the latest launch, by request id; the engine
        # takes them (take_failures) and ends those requests. Their rows sample nothing.
        self.failures: dict[str, RequestError] = {}

    # ---- KV cache ------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        mc = self.model_config
        target = kv_cache_block_bytes(mc.kv_heads_per_rank, mc.head_dim, mc.num_layers,
                                      self.block_size, self.kv_cache_dtype)
        paged = self.paged_proposer
        return target + (paged.bytes_per_block() if paged is not None else 0)

    def determine_num_blocks(self) -> int:
        """Blocks that fit the budget: num_kv_blocks, kv_cache_memory_bytes, or what is free."""
        args = self.config.args
        needed = self.config.max_blocks_per_req
        if args.num_kv_blocks is not None:
            num_blocks = args.num_kv_blocks
        else:
            budget = args.kv_cache_memory_bytes
            if budget is None:
                budget = self._default_budget()
            num_blocks = budget // self.bytes_per_block()
            if args.kv_cache_memory_bytes is None and self.device.type == "cpu":
                # On the CPU keep the default no larger than the engine could ever fill.
                num_blocks = min(num_blocks, needed * self.config.max_num_seqs)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than "
                f"one request of max_model_len={self.config.max_model_len} needs ({needed}); "
                "lower max_model_len or give the cache more room (num_kv_blocks, "
                "kv_cache_memory_bytes, gpu_memory_utilization)"
            )
        return int(num_blocks)

    def _default_budget(self) -> int:
        if self.device.type != "cuda":
            return _CPU_KV_CACHE_BYTES
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        return kv_cache_budget(
            self._memory_at_start, DeviceMemory.read(), peak,
            self.config.args.gpu_memory_utilization,
        )

    def _profile_run(self) -> None:
        profile_run(self)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        self.kv_caches = allocate_kv_caches(mc.kv_heads_per_rank, mc.head_dim, mc.num_layers,
                                            num_blocks, self.block_size, self.kv_cache_dtype,
                                            self.device)
        if self.paged_proposer is not None:
            self.paged_proposer.initialize_kv_cache(num_blocks)

    def time_forwards(self) -> list[tuple[int, float]]:
        """Start-up step timings for the speculation controller (see dummy_forwards)."""
        return time_forwards(self)

    # ---- one step ------------------------------------------------------------------------

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step and waits for its tokens."""
        launched = self.launch(sched)
        return EMPTY_RUNNER_OUTPUT if launched is None else self.collect(launched)

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> Optional[LaunchedStep]:
        """Queues one step on the device and returns without waiting for it (None if the
        step is empty). Decodes that follow a step not yet collected read their input token
        from that step's device output, so the two need not meet on the host."""
        if self._older is not None:
            self.collect(self._older)  # pending inputs may only refer to the latest step
        self._update_batch(sched)
        if sched.is_empty:
            return None
        scheduled = sched.num_scheduled_tokens
        if self.failures:  # a new request's sampling setup failed: it has no row to run
            scheduled = {r: n for r, n in scheduled.items() if r not in self.failures}
            if not scheduled:
                return None
        batch = self.batch
        row_of = batch.row_of
        rows = np.fromiter((row_of[r] for r in scheduled), np.int64, len(scheduled))
        num_sched = np.fromiter(scheduled.values(), np.int32, len(rows))
        latest = self._latest
        pending_from = latest if latest is not None and latest.output is None else None
        if pending_from is not None and batch.needs_output_tokens:
            self.collect(pending_from)  # penalties and bad words read the previous tokens
            pending_from = None
        inputs, sample_mask, layout = self._prepare_inputs(
            rows, num_sched, pending_from, sched.scheduled_spec_decode_tokens
        )
        prompt_plan = (
            batch.prompt_logprobs_plan(rows, num_sched) if batch.prompt_logprob_rows else None
        )
        start = time.perf_counter()
        logits, prompt_logprobs, aux = self._forward_logits(inputs, prompt_plan)
        self.spec_timing.forward += time.perf_counter() - start
        features = None
        if aux is not None:  # for the EAGLE-3 head, which takes every step's features
            total = inputs.metadata.num_actual_tokens
            slots = self.buffers.host(self.buffers.slot_mapping)[:total]
            features = self.eagle3.step_features(batch, rows, num_sched, slots, aux)
        batch.num_computed[rows] += num_sched
        sample_rows = sampling = rows[sample_mask]
        start = time.perf_counter()
        out = None
        if len(sample_rows) and layout is not None:
            out, sample_rows, layout = self._verify(logits, sample_rows, layout)
        elif len(sample_rows):
            try:
                out = self.sampler(logits, batch.sampling_metadata(sample_rows, self.device))
            except Exception as e:
                out, sample_rows = self._sample_isolating(logits, sample_rows, e)
        self.spec_timing.sample += time.perf_counter() - start
        if out is None:  # only partial prefill chunks this step (or only failed rows)
            out = SamplerOutput(sampled=torch.empty(0, dtype=torch.int64, device=self.device))
        sampled = out.sampled if out.sampled.dim() == 2 else out.sampled[:, None]
        if self.share_sampled is not None:
            sampled = self.share_sampled(sampled, sampling, sample_rows)
        launched = LaunchedStep(
            req_ids=[batch.req_id_of[r] for r in sample_rows.tolist()],
            rows=sample_rows,
            positions=batch.reserve_sampled(sample_rows),
            serials=batch.serial[sample_rows],
            sampled=sampled,
            sampled_host=self._to_host(sampled),
            logprobs_host=None if out.logprobs is None else (
                self._to_host(out.logprob_token_ids), self._to_host(out.logprobs),
                self._to_host(out.sampled_rank),
            ),
            num_logprobs=batch.num_logprobs[sample_rows],
            prompt_logprobs=None if prompt_logprobs is None else PromptLogprobsTensors(
                prompt_logprobs.plan, self._to_host(prompt_logprobs.token_ids),
                self._to_host(prompt_logprobs.logprobs), self._to_host(prompt_logprobs.ranks),
            ),
            num_drafts=None if layout is None else layout.num_drafts,
            num_lookahead=sched.num_lookahead_tokens if self.proposer is not None else 0,
            features=features,
            done=self._record_event(),  # last: after the copies above
        )
        self._older, self._latest = self._latest, launched
        return launched

    def _verify(
        self, logits: torch.Tensor, rows: np.ndarray, layout: DraftLayout
    ) -> tuple[Optional[SamplerOutput], np.ndarray, DraftLayout]:
        """Verifies the rows' drafts. If that fails, the rows are sampled as without drafts
        at their first positions (all drafts rejected: still exact), isolating the failure;
        the layout returned is that of the rows that sampled."""
        meta = self.batch.sampling_metadata(rows, self.device)
        try:
            return verify(self.rejection_sampler, logits, layout, meta,
                          self.returns_tokens), rows, layout
        except Exception as e:
            logger.warning("verifying drafts failed (%s: %s); sampling without them",
                           type(e).__name__, e)
            first = first_positions(logits, layout)
            try:
                out = self.sampler(first, meta)
            except Exception as e:
                out, kept = self._sample_isolating(first, rows, e)
                layout = layout.select(np.isin(rows, kept))
                rows = kept
            return out, rows, layout

    def _sample_isolating(
        self, logits: torch.Tensor, rows: np.ndarray, failure: Exception
    ) -> tuple[Optional[SamplerOutput], np.ndarray]:
        """After sampling ``rows`` failed: fails the requests of the rows that fail on their
        own, samples the others (see worker/isolation.py); re-raises what no row explains."""
        batch = self.batch
        out, keep, bad = sample_isolating(
            self.sampler, logits, rows,
            lambda some: batch.sampling_metadata(some, self.device),
            batch.rewind_generators, failure,
        )
        for row, error in bad.items():
            req_id = batch.req_id_of[row]
            self.failures[req_id] = RequestError(req_id, "sampling", error)
        return out, rows[keep]

    def take_failures(self) -> dict[str, RequestError]:
        """The requests whose own work failed since the last call (see ``failures``)."""
        failures, self.failures = self.failures, {}
        return failures

    def _record_event(self) -> Optional[torch.cuda.Event]:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @property
    def latest_sampled(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The latest step's sampling rows and their tokens ([n, W]) once it is collected."""
        step = self._latest
        if step is None or step.output is None:
            return None
        return step.rows, step.sampled_host.numpy()

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        # Into pinned memory without waiting; LaunchedStep.done says when it has landed.
        return t.to("cpu", non_blocking=True) if t.device.type == "cuda" else t

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Waits for a launched step's tokens, records them in the batch, returns them."""
        if launched.output is not None:
            return launched.output
        if launched.done is not None:
            launched.done.synchronize()
        sampled = launched.sampled_host.numpy()
        counts = self.batch.fill_sampled(
            launched.rows, launched.positions, launched.serials, sampled, launched.num_drafts
        )
        logprobs = None
        if launched.logprobs_host is not None:
            wanted = launched.num_logprobs
            if sampled.shape[1] > 1:  # one entry per emitted token
                wanted = np.repeat(wanted, counts)
            logprobs = logprobs_lists(wanted, *launched.logprobs_host)
        rows_tokens = sampled.tolist()
        if sampled.shape[1] > 1:
            rows_tokens = [tokens[:n] for tokens, n in zip(rows_tokens, counts.tolist())]
        # Its aux may be a CUDA graph's output, which the next step overwrites.
        features, launched.features = launched.features, None
        if features is not None and not launched.num_lookahead:
            self.eagle3.catch_up(self.batch, features, drafting=False)
        launched.output = ModelRunnerOutput(
            launched.req_ids, rows_tokens, logprobs,
            None if launched.prompt_logprobs is None else launched.prompt_logprobs.to_chunks(),
            self._propose(launched, features) if launched.num_lookahead else None,
        )
        if launched is self._older:
            self._older = None
        return launched.output

    def _propose(self, launched: LaunchedStep,
                 features: Optional[StepFeatures]) -> list[list[int]]:
        """Drafts for the next step of each row that sampled (its tokens are all known now)."""
        start = time.perf_counter()
        rows = launched.rows
        if features is not None:
            self.eagle3.catch_up(self.batch, features, drafting=True)
        drafts, counts = self.proposer.propose(self.batch, rows, launched.num_lookahead)
        seconds = time.perf_counter() - start
        self.spec_timing.observe_proposal(len(rows), int((counts > 0).sum()),
                                          launched.num_lookahead, seconds)
        return [d[:n] for d, n in zip(drafts.tolist(), counts.tolist())]

    def _update_batch(self, sched: SchedulerOutput) -> None:
        batch = self.batch
        for rid in sched.finished_req_ids:
            batch.remove(rid)
        for new in sched.scheduled_new_reqs:
            try:
                batch.add(new, self.device)
            except Exception as e:  # only this request's parameters were read
                batch.remove(new.req_id)
                self.failures[new.req_id] = RequestParamsError(new.req_id, "sampling setup", e)
        for rid, block_ids in sched.new_block_ids.items():
            batch.append_blocks(batch.row_of[rid], block_ids)

    def _prepare_inputs(
        self,
        rows: np.ndarray,
        num_sched: np.ndarray,
        pending_from: Optional[LaunchedStep],
        spec: Optional[dict[str, list[int]]] = None,
    ) -> tuple[ForwardInputs, np.ndarray, Optional[DraftLayout]]:
        """Writes the flattened batch into the step buffers; returns it, which rows sample,
        and (with drafts) where the sampling rows' drafts are.

        Rows whose last token ``pending_from`` has not delivered yet get it on the device.
        A row with k drafts samples at its last 1 + k positions."""
        batch, bs, buf = self.batch, self.block_size, self.buffers
        buf.wait_for_upload()  # the last step's copies must have left the host buffers
        num_reqs = len(rows)
        computed = batch.num_computed[rows]
        cu = np.cumsum(num_sched)
        total = int(cu[-1])
        max_query_len = int(num_sched.max())
        # A step whose requests all compute the same number of tokens (decodes, or decodes
        # verifying k drafts each) and that a CUDA graph serves is padded to the graph's size.
        graph_size = self.graphs.size_for(num_reqs, max_query_len) if (
            self.graphs is not None and int(num_sched.min()) == max_query_len
        ) else None
        padded = graph_size * max_query_len if graph_size else total

        seq_lens = computed + num_sched
        # A row samples when this step reaches the end of its known tokens.
        sample_mask = seq_lens >= batch.num_tokens[rows]
        layout = None
        if spec:  # the drafts go after the known tokens, where the inputs are read from
            layout = layout_drafts([batch.req_id_of[r] for r in rows[sample_mask]], spec)
            batch.write_drafts(rows[sample_mask], layout.draft_token_ids)

        req_of_token = np.repeat(np.arange(num_reqs), num_sched)
        positions = computed[req_of_token] + (np.arange(total) - (cu - num_sched)[req_of_token])
        token_rows = rows[req_of_token]
        host = buf.host
        host(buf.input_ids)[:total] = batch.token_ids[token_rows, positions]
        host(buf.positions)[:total] = positions
        slots = host(buf.slot_mapping)
        slots[:total] = batch.block_table[token_rows, positions // bs]
        slots[:total] *= bs
        slots[:total] += positions % bs
        qsl = host(buf.query_start_loc)
        qsl[0] = 0
        qsl[1 : num_reqs + 1] = cu
        host(buf.seq_lens)[:num_reqs] = seq_lens
        if graph_size:  # padding rows: write nothing, attend to their own harmless slots
            slots[total:padded] = -1
            host(buf.input_ids)[total:padded] = 0
            host(buf.positions)[total:padded] = 0
            qsl[num_reqs + 1 : graph_size + 1] = (
                total + max_query_len * np.arange(1, graph_size - num_reqs + 1)
            )
            host(buf.seq_lens)[num_reqs:graph_size] = max_query_len
        if layout is not None:
            per_row = layout.num_drafts + 1
            num_logits = int(per_row.sum())
            # Row i's positions cu_i - (1 + k_i) .. cu_i - 1, at flat logits from first_i.
            shift = np.repeat(cu[sample_mask] - per_row - layout.first_logit, per_row)
            host(buf.logits_indices)[:num_logits] = shift + np.arange(num_logits)
        else:
            num_logits = int(sample_mask.sum())
            host(buf.logits_indices)[:num_logits] = cu[sample_mask] - 1
        max_seq_len = int(seq_lens.max())
        width = -(-max_seq_len // bs)
        buf.block_table_host(num_reqs, width)[:] = batch.block_table[rows, :width]
        num_pending, in_order = 0, False
        if pending_from is not None:
            # Such a row decodes exactly one token: the one its previous step sampled.
            src = batch.pending_idx[rows]
            has = src >= 0
            num_pending = int(has.sum())
            # The steady state: the same decodes as last step, in the same order.
            in_order = num_pending == num_reqs == total and bool(
                (src == np.arange(num_reqs)).all()
            )
            if num_pending and not in_order:
                host(buf.pending_dst)[:num_pending] = (cu - 1)[has]
                host(buf.pending_src)[:num_pending] = src[has]
        buf.upload(padded, graph_size or num_reqs, num_logits, num_reqs, width,
                   0 if in_order else num_pending)
        if in_order:
            buf.input_ids[1][:num_reqs].copy_(pending_from.sampled[:num_reqs, 0])
        elif num_pending:
            buf.input_ids[1].index_copy_(
                0, buf.pending_dst[1][:num_pending],
                pending_from.sampled[:, 0].index_select(0, buf.pending_src[1][:num_pending]),
            )

        meta = AttentionMetadata(
            num_actual_tokens=total,
            num_reqs=num_reqs,
            query_start_loc=buf.query_start_loc[1][: num_reqs + 1],
            seq_lens=buf.seq_lens[1][:num_reqs],
            block_table=buf.block_table_for(num_reqs, width),
            slot_mapping=buf.slot_mapping[1][:total],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=buf.query_start_loc[0][: num_reqs + 1],
            seq_lens_cpu=buf.seq_lens[0][:num_reqs],
        )
        inputs = ForwardInputs(
            input_ids=buf.input_ids[1][:total],
            positions=buf.positions[1][:total],
            metadata=meta,
            logits_indices=buf.logits_indices[1][:num_logits],
            graph_size=graph_size,
        )
        return inputs, sample_mask, layout

    def _forward_logits(
        self, inputs: ForwardInputs, prompt_plan: Optional[PromptLogprobsPlan]
    ) -> tuple[torch.Tensor, Optional[PromptLogprobsTensors], Optional[torch.Tensor]]:
        """Runs the forward; returns the logits of the rows that sample, with a plan the
        prompt logprobs it asks for (from the hidden states, before they are freed), and the
        aux hidden states of every token when an EAGLE-3 head reads them."""
        if inputs.graph_size:
            output = self.graphs.replay(inputs.graph_size, inputs.metadata.max_query_len)
        else:
            self.attn.prepare(inputs.metadata)
            output = self.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata
            )
        hidden, aux = split_aux(output)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if prompt_plan is None:
            return logits, None, aux
        return logits, compute_prompt_logprobs(
            self.model.compute_logits, hidden, prompt_plan, self.vocab_size
        ), aux

    def capture_graphs(self) -> None:
        """Captures decode CUDA graphs (CUDA only, unless enforce_eager or the attention backend
        cannot be replayed)."""
        reason = graphs_unusable(self.device, self.config.args.enforce_eager, self.attn)
        if reason is not None:
            if self.device.type == "cuda":
                logger.info("decode steps run eagerly: %s", reason)
            return
        # With speculation, also decodes that verify k drafts each (a uniform batch: the
        # drafts of a draft model, or n-gram lookups that all matched).
        query_lens = (1,) if self.speculative is None else (
            1, 1 + self.speculative.num_speculative_tokens)
        self.graphs = CudaGraphRunner(
            self.model, self.attn, self.buffers, self.kv_caches,
            self.config.max_num_seqs, self.config.max_model_len, query_lens,
        )
        self.graphs.capture()
        if self.draft_model is not None:
            self.draft_model.graphs = capture_draft_graphs(self.draft_model, self.config)
