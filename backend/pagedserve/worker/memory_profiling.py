"""How much GPU memory the KV cache may take: the arithmetic, and the worst cases of the
sampler and of prompt logprobs.

The budget follows vLLM: ``gpu_memory_utilization`` is the share of the device this engine may
use. What it needs besides the KV cache is measured: the torch allocator's peak over the
weights and a profiling step (a forward over ``max_num_batched_tokens``, prompt logprobs for
all of it, and the sampler at its worst), plus what the process took outside torch's
allocator meanwhile (cuBLAS workspaces, kernels). Memory other processes hold is seen through
``torch.cuda.mem_get_info``: the share must be free when the engine starts, and the cache never
takes more than is free now.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.worker.prompt_logprobs import PromptLogprobsPlan
from pagedserve.worker.sampler import SamplingMetadata

GIB = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    """One reading of the device (``torch.cuda.mem_get_info``) and of this process's torch
    allocator (``memory_reserved``), in bytes."""

    free: int
    total: int
    torch_reserved: int

    @classmethod
    def read(cls) -> DeviceMemory:
        free, total = torch.cuda.mem_get_info()
        return cls(int(free), int(total), int(torch.cuda.memory_reserved()))


def kv_cache_budget(
    start: DeviceMemory, now: DeviceMemory, torch_peak: int, utilization: float
) -> int:
    """Bytes the KV cache may take.

    ``start``: read before the weights were loaded; ``now``: after the profiling step, with the
    allocator's cache emptied; ``torch_peak``: the allocator's peak since ``start`` (weights,
    activations, sampler). Raises ValueError when the share is not free or nothing is left.
    """
    requested = int(start.total * utilization)
    if start.free < requested:
        raise ValueError(
            f"free GPU memory at start ({start.free / GIB:.2f} GiB of {start.total / GIB:.2f} "
            f"GiB) is less than gpu_memory_utilization={utilization} asks for "
            f"({requested / GIB:.2f} GiB): other processes hold the rest; lower "
            "gpu_memory_utilization or free GPU memory"
        )
    used_since_start = start.free - now.free
    non_torch = max(0, used_since_start - (now.torch_reserved - start.torch_reserved))
    budget = requested - torch_peak - non_torch
    # Another process may have taken memory since start: stay within what is free now, less
    # what the activations will take again (their peak above what torch still holds).
    headroom = max(0, torch_peak - now.torch_reserved)
    budget = min(budget, now.free - headroom)
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: the model and its peak activations take "
            f"{torch_peak / GIB:.2f} GiB and {non_torch / GIB:.2f} GiB more outside torch, of "
            f"the {requested / GIB:.2f} GiB that gpu_memory_utilization={utilization} allows, "
            f"and {now.free / GIB:.2f} GiB are free; raise gpu_memory_utilization or lower "
            "max_num_batched_tokens / max_num_seqs"
        )
    return budget


def worst_case_sampling(
    num_rows: int, vocab_size: int, device: torch.device, max_logprobs: int
) -> SamplingMetadata:
    """Sampling parameters that take every memory-hungry path of the Sampler at once, for
    ``num_rows`` rows: allowed-token masks and logit bias, penalties (vocab-wide counts and
    masks), bans, min-p, the top-k/top-p sort, greedy and random rows mixed, and the widest
    logprobs."""

    def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((num_rows,), value, dtype=dtype, device=device)

    temperature = full(0.8)
    temperature[0] = 0.0  # one greedy row: the mixed path computes both
    return SamplingMetadata(
        temperature=temperature,
        all_greedy=False,
        all_random=num_rows == 1,
        top_k=full(max(1, vocab_size // 2), torch.int64),
        top_p=full(0.9),
        min_p=full(0.05),
        generators={},
        output_counts=torch.ones(num_rows, vocab_size, dtype=torch.int32, device=device),
        seen_mask=torch.ones(num_rows, vocab_size, dtype=torch.bool, device=device),
        repetition_penalty=full(1.1),
        presence_penalty=full(0.1),
        frequency_penalty=full(0.1),
        banned_rows=torch.zeros(1, dtype=torch.int64, device=device),
        banned_tokens=torch.zeros(1, dtype=torch.int64, device=device),
        max_num_logprobs=min(max_logprobs, vocab_size - 1),
        allowed_rows=torch.arange(num_rows, device=device),
        disallowed=torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device),
        bias_rows=torch.zeros(1, dtype=torch.int64, device=device),
        bias_tokens=torch.zeros(1, dtype=torch.int64, device=device),
        bias_values=torch.ones(1, device=device),
    )


def worst_case_prompt_logprobs(
    num_tokens: int, vocab_size: int, max_logprobs: int
) -> PromptLogprobsPlan:
    """Prompt logprobs for every one of a step's ``num_tokens`` tokens at the widest top-k:
    their results, and one slice of logits at a time (``prompt_logprobs.slice_rows``)."""
    index = np.arange(num_tokens, dtype=np.int64)
    return PromptLogprobsPlan(
        req_ids=["profile"], first_positions=[0], counts=[num_tokens],
        num_logprobs=[min(max_logprobs, vocab_size)],
        token_index=index, targets=index % vocab_size,
    )
