"""Forwards over dummy inputs, before any request: the largest step's peak memory (to size the
KV cache) and decode steps' times (to seed the speculation controller)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pagedserve.attention.base import AttentionMetadata
from pagedserve.models.eagle3 import split_aux
from pagedserve.worker.memory_profiling import worst_case_prompt_logprobs, worst_case_sampling
from pagedserve.worker.prompt_logprobs import compute_prompt_logprobs
from pagedserve.worker.verification import DraftLayout, verify

# Each function takes the ModelRunner (typed Any: importing it here would make a cycle) and
# reads its model, attention backend, sampler and configuration.


def profile_run(runner: Any) -> None:
    """The largest step the engine can run, to measure its peak memory: a forward over
    max_num_batched_tokens dummy tokens, then logits for the most rows a step samples,
    a slice of prompt logprobs, and the sampler at its worst on those rows (see
    ``worst_case_sampling``); with speculation, also the verification of the most drafts
    a step holds, and an EAGLE-3 head's catch-up over the step's tokens."""
    tokens = min(runner.config.max_num_batched_tokens, runner.config.max_model_len)
    cache = [torch.empty(2, 1, runner.block_size, runner.model_config.kv_heads_per_rank,
                         runner.model_config.head_dim, dtype=runner.kv_cache_dtype,
                         device=runner.device)
             for _ in range(runner.model_config.num_layers)]
    meta = AttentionMetadata(
        num_actual_tokens=tokens, num_reqs=1,
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=runner.device),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=runner.device),
        block_table=torch.zeros(1, -(-tokens // runner.block_size), dtype=torch.int32,
                                device=runner.device),
        slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=runner.device),
        max_query_len=tokens, max_seq_len=tokens,
        query_start_loc_cpu=torch.tensor([0, tokens], dtype=torch.int32),
        seq_lens_cpu=torch.tensor([tokens], dtype=torch.int32),
    )
    ids = torch.zeros(tokens, dtype=torch.long, device=runner.device)
    rows = min(runner.config.max_num_seqs, runner.config.max_num_batched_tokens)
    max_logprobs = runner.config.args.max_logprobs  # -1: no cap, the whole vocabulary
    if max_logprobs < 0:
        max_logprobs = runner.vocab_size
    with torch.inference_mode():
        runner.attn.prepare(meta)
        hidden, aux = split_aux(
            runner.model(ids, torch.arange(tokens, device=runner.device), cache, meta))
        index = torch.arange(rows, device=runner.device) % tokens
        logits = runner.model.compute_logits(hidden[index])
        verification = None
        if runner.rejection_sampler is not None:
            # A verification step samples at 1 + k positions per request.
            k = runner.speculative.num_speculative_tokens
            reqs = max(1, min(rows, tokens // (1 + k)))
            index = torch.arange(reqs * (1 + k), device=runner.device) % tokens
            verification = (reqs, k, runner.model.compute_logits(hidden[index]))
        # As in a step: prompt logprobs (one slice at the widest top-k) while the hidden
        # states live; only the logits outlive the forward.
        compute_prompt_logprobs(
            runner.model.compute_logits, hidden,
            worst_case_prompt_logprobs(tokens, runner.vocab_size, max_logprobs),
            runner.vocab_size,
        )
        if runner.eagle3 is not None:  # the head's catch-up over every token of the step
            head = runner.eagle3
            head_cache = [torch.empty(2, 1, runner.block_size, head.model_config.num_kv_heads,
                                      head.model_config.head_dim, dtype=runner.kv_cache_dtype,
                                      device=runner.device)]
            head.attn.prepare(meta)
            head.head(ids, torch.arange(tokens, device=runner.device),
                      head.head.combine_hidden_states(aux), head_cache, meta)
        del hidden, aux
        runner.sampler(
            logits, worst_case_sampling(rows, runner.vocab_size, runner.device, max_logprobs)
        )
        if verification is not None:
            reqs, k, spec_logits = verification
            del logits
            layout = DraftLayout(np.full(reqs, k, dtype=np.int64),
                                 np.zeros((reqs, k), dtype=np.int64),
                                 np.arange(reqs, dtype=np.int64) * (1 + k))
            verify(runner.rejection_sampler, spec_logits, layout,
                   worst_case_sampling(reqs, runner.vocab_size, runner.device, max_logprobs))
            logits = spec_logits
    del cache, logits


@torch.inference_mode()
def time_forwards(runner: Any, repeats: int = 3) -> list[tuple[int, float]]:
    """Seconds of a forward and its logits over n decode rows, for n = 1, 2, 4, ... up to the
    largest verification step, each row attending to a context of half max_model_len (at most
    512 tokens; a row's attention grows with it as much as its matmuls do): the seed of the
    speculation controller's step cost model, which then follows the measured steps. The best
    of ``repeats`` runs. Needs the KV cache (it reads, and writes nothing)."""
    k = runner.speculative.num_speculative_tokens if runner.speculative is not None else 0
    largest = min(runner.config.max_num_batched_tokens, runner.config.max_num_seqs * (1 + k))
    sizes = [1 << i for i in range(largest.bit_length()) if 1 << i <= largest]
    block_size, device = runner.block_size, runner.device
    num_blocks = runner.kv_caches[0].shape[1]
    context = max(1, min(runner.config.max_model_len // 2, 512, num_blocks * block_size))
    blocks = torch.arange(-(-context // block_size), dtype=torch.int32, device=device)
    timings = []
    for n in sizes:
        meta = AttentionMetadata(
            num_actual_tokens=n, num_reqs=n,
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            seq_lens=torch.full((n,), context, dtype=torch.int32, device=device),
            block_table=blocks.expand(n, -1).contiguous(),
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            max_query_len=1, max_seq_len=context,
            query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((n,), context, dtype=torch.int32),
        )
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.full((n,), context - 1, dtype=torch.long, device=device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            runner.attn.prepare(meta)
            hidden, _ = split_aux(runner.model(ids, positions, runner.kv_caches, meta))
            runner.model.compute_logits(hidden)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        timings.append((n, best))
    return timings
