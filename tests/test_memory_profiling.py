"""The KV-cache budget on a GPU (arithmetic only, runs anywhere), the sampler's worst case
that the profiling step runs, and what bounds the CPU engine's memory: oneDNN row buckets
and large activations kept out of the heap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedserve.config import EngineArgs, resolve_engine_config
from pagedserve.layers.linear import onednn_linear, onednn_pack, onednn_rows
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.memory_profiling import (
    GIB,
    DeviceMemory,
    kv_cache_budget,
    worst_case_sampling,
)
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.sampler import Sampler

TOTAL = 100 * GIB
CONTEXT = 1 * GIB  # the CUDA context, taken before the first reading
WEIGHTS = 10 * GIB
ACTIVATIONS = 5 * GIB  # the profiling step's peak above the weights
NON_TORCH = 1 * GIB  # cuBLAS workspaces and kernels, outside torch's allocator


def _readings(others_at_start: int = 0, others_later: int = 0):
    start = DeviceMemory(free=TOTAL - CONTEXT - others_at_start, total=TOTAL, torch_reserved=0)
    now = DeviceMemory(
        free=start.free - WEIGHTS - NON_TORCH - others_later, total=TOTAL,
        torch_reserved=WEIGHTS,
    )
    return start, now, WEIGHTS + ACTIVATIONS


def test_budget_is_the_share_less_what_the_engine_measured():
    start, now, peak = _readings()
    assert kv_cache_budget(start, now, peak, 0.9) == 90 * GIB - peak - NON_TORCH


def test_budget_fails_when_other_processes_hold_the_share():
    start, now, peak = _readings(others_at_start=20 * GIB)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9.*other processes"):
        kv_cache_budget(start, now, peak, 0.9)
    # A smaller share fits beside them.
    assert kv_cache_budget(start, now, peak, 0.7) == 70 * GIB - peak - NON_TORCH


def test_budget_stays_within_what_is_free_when_another_process_grows():
    # Growth of another process while this one loads cannot be told apart from this
    # process's own memory outside torch, so it counts against the share (conservative).
    start, now, peak = _readings(others_later=20 * GIB)
    assert kv_cache_budget(start, now, peak, 0.9) == 90 * GIB - peak - NON_TORCH - 20 * GIB


def test_budget_never_exceeds_what_is_free_now():
    start, _, peak = _readings()
    # torch's allocator kept 60 GiB cached that it could not give back: 25 GiB are free.
    now = DeviceMemory(free=25 * GIB, total=TOTAL, torch_reserved=70 * GIB + 4 * GIB)
    assert kv_cache_budget(start, now, peak, 0.9) == 25 * GIB


def test_no_room_left_names_the_remedies():
    start, now, peak = _readings()
    with pytest.raises(ValueError, match="no GPU memory is left.*gpu_memory_utilization"):
        kv_cache_budget(start, now, 16 * GIB, 0.17)


def test_worst_case_sampling_takes_every_path():
    vocab, rows = 300, 6
    meta = worst_case_sampling(rows, vocab, torch.device("cpu"), max_logprobs=20)
    logits = torch.randn(rows, vocab)
    out = Sampler()(logits, meta)
    assert out.sampled.shape == (rows,)
    assert bool(((out.sampled >= 0) & (out.sampled < vocab)).all())
    assert out.sampled[0] != 0  # row 0, the greedy one, has token 0 banned (min_tokens)
    assert out.logprobs.shape == (rows, 21)
    for name in ("top_k", "top_p", "min_p", "output_counts", "seen_mask",
                 "repetition_penalty", "banned_rows", "disallowed", "bias_rows"):
        assert getattr(meta, name) is not None, name
    assert not meta.all_greedy and not meta.all_random


def test_profile_run_samples_the_largest_batch_at_its_worst(tiny_model_dir):
    path = tiny_model_dir("llama", "bpe")
    args = EngineArgs(model=str(path), device="cpu", max_num_seqs=8,
                      max_num_batched_tokens=32)
    model_config = ModelConfig.from_pretrained(args.model)
    config = resolve_engine_config(args, model_config.max_position_embeddings, "float32")
    runner = ModelRunner(config, model_config)
    seen = []
    sampler = runner.sampler
    runner.sampler = lambda logits, meta: seen.append((logits.shape, meta)) or sampler(
        logits, meta)
    runner._profile_run()
    (shape, meta), = seen
    assert shape == (8, model_config.vocab_size)
    assert meta.output_counts.shape == (8, model_config.vocab_size)
    assert meta.max_num_logprobs == 20


def test_profile_run_verifies_the_most_drafts_a_step_holds(tiny_model_dir):
    path = tiny_model_dir("llama", "bpe")
    args = EngineArgs(model=str(path), device="cpu", max_num_seqs=8,
                      max_num_batched_tokens=32,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    model_config = ModelConfig.from_pretrained(args.model)
    config = resolve_engine_config(args, model_config.max_position_embeddings, "float32")
    runner = ModelRunner(config, model_config)
    seen = []
    verifier = runner.rejection_sampler
    runner.rejection_sampler = lambda drafts, num, logits, meta: seen.append(
        (drafts.shape, logits.shape, meta)) or verifier(drafts, num, logits, meta)
    runner._profile_run()
    (drafts_shape, logits_shape, meta), = seen
    assert drafts_shape == (8, 3) and logits_shape == (32, model_config.vocab_size)
    assert meta.output_counts is not None and meta.max_num_logprobs == 20


def test_onednn_rows_are_few_and_close():
    sizes = {onednn_rows(m) for m in range(1, 2049)}
    assert len(sizes) == 51
    assert all(onednn_rows(m) >= m for m in range(1, 9000))
    assert max((onednn_rows(m) - m) / m for m in range(65, 9000)) <= 0.125


@pytest.mark.skipif(
    onednn_pack(torch.zeros(4, 4)) is None, reason="oneDNN's linear is not available"
)
def test_onednn_linear_pads_without_changing_the_result():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    packed = onednn_pack(weight)
    for rows in (1, 3, 9, 70, 300):
        x = torch.randn(rows, 32)
        out = onednn_linear(x, packed, bias)
        assert out.shape == (rows, 48)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias))


HEAP_PROBE = """
import sys
import torch
from pagedserve.worker.host_memory import keep_large_buffers_mapped
if sys.argv[1] == "engine":
    assert keep_large_buffers_mapped()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
keep = []
base = rss()
for mib in (20, 12, 16, 10, 18):  # activations of steps of different sizes
    step = torch.ones(mib << 18)
    keep.append(torch.ones(1000))  # something small and long-lived allocated after it
    del step
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_large_activations_leave_the_process():
    """With glibc's default, freed multi-MiB buffers stay resident behind small live ones;
    with the engine's setting (made by a CPU ModelRunner) they are returned."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)

    def retained_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], env=env,
                             capture_output=True, text=True, check=True)
        return float(out.stdout)

    default, engine = retained_mib("default"), retained_mib("engine")
    # Default: the first 20 MiB buffer is mapped, and raises the threshold, so the later ones
    # (up to 18 MiB) come from the heap and stay (19-21 MiB seen); the engine's: about 1 MiB.
    assert default > 15 and engine < default / 2, (default, engine)
