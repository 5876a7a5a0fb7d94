"""Attention backends through the AttentionBackend interface, and the selector's refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_testing import assert_close, device, make_batch

from pagedserve.attention import selector
from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.selector import get_attention_backend
from pagedserve.attention.torch_backend import TorchAttentionBackend


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _step(q_lens, ctx_lens, heads, head_dim, block_size, dtype, num_padding):
    """A forward's inputs: the cache holds the context, key/value hold this step's tokens."""
    b = make_batch(q_lens, ctx_lens, *heads, head_dim, block_size, dtype,
                   num_padding=num_padding, poison_unused=False)
    gen = torch.Generator().manual_seed(1)
    shape = (b.query.shape[0], heads[1], head_dim)
    key = torch.randn(*shape, generator=gen).to(b.query.device, dtype)
    value = torch.randn(*shape, generator=gen).to(b.query.device, dtype)
    meta = AttentionMetadata(
        num_actual_tokens=b.num_actual_tokens, num_reqs=len(q_lens),
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens, block_table=b.block_table,
        slot_mapping=b.slot_mapping, max_query_len=b.max_query_len, max_seq_len=b.max_seq_len,
        query_start_loc_cpu=b.query_start_loc.cpu(), seq_lens_cpu=b.seq_lens.cpu(),
    )
    return b, key, value, meta


def _compare_with_torch(name, q_lens, ctx_lens, heads, head_dim, block_size, dtype,
                        num_padding=3, tolerance_dtype=None):
    b, key, value, meta = _step(q_lens, ctx_lens, heads, head_dim, block_size, dtype,
                                num_padding)
    args = (heads[0], heads[1], head_dim, head_dim ** -0.5, block_size)
    ref_backend = TorchAttentionBackend(*args)
    backend = get_attention_backend(name, b.query.device, *args)
    assert backend.name == name
    caches, outs = [], []
    for be in (ref_backend, backend):
        cache = b.kv_cache.clone()
        m = AttentionMetadata(**{**meta.__dict__, "plan": None})
        be.prepare(m)
        outs.append(be.forward(b.query, key, value, cache, m))
        caches.append(cache)
    n = b.num_actual_tokens
    assert torch.equal(caches[0], caches[1]), "the backends wrote the KV cache differently"
    assert_close(outs[1][:n], outs[0][:n], tolerance_dtype or dtype, what=name)


MIXED = ([1, 37, 1, 16, 5, 1], [599, 100, 0, 0, 31, 63])
DECODE = ([1, 1, 1, 1], [0, 17, 300, 64])


@pytest.mark.parametrize("batch", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads,block_size", [((8, 2), 16), ((4, 4), 32)])
def test_triton_matches_torch_backend(batch, heads, block_size):
    _compare_with_torch("triton", *batch, heads, 64, block_size, torch.float32)


def test_triton_matches_torch_backend_fp16():
    # The torch backend's decode path multiplies fp16 probabilities: compare at a looser bound.
    _compare_with_torch("triton", *MIXED, (8, 2), 128, 16, torch.float16,
                        tolerance_dtype=torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _has("flash_attn"), reason="flash-attn is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [MIXED, DECODE], ids=["mixed", "decode"])
def test_flash_attn_matches_torch_backend(dtype, batch):
    _compare_with_torch("flash_attn", *batch, (8, 2), 128, 256, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not _has("flashinfer"), reason="flashinfer is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [MIXED, DECODE], ids=["mixed", "decode"])
def test_flashinfer_matches_torch_backend(dtype, batch):
    _compare_with_torch("flashinfer", *batch, (8, 2), 128, 16, dtype)


# ---- selector ----

ARGS = (8, 2, 64, 0.125, 16)


def test_selector_unknown_name():
    with pytest.raises(ValueError, match="unknown attention_backend 'xformers'"):
        get_attention_backend("xformers", torch.device("cpu"), *ARGS)


def test_selector_torch_and_auto():
    assert get_attention_backend("torch", torch.device("cpu"), *ARGS).name == "torch"
    assert get_attention_backend("auto", torch.device("cpu"), *ARGS).name == "torch"
    if torch.cuda.is_available():
        assert get_attention_backend("auto", torch.device("cuda"), *ARGS).name == "triton"
        assert get_attention_backend("torch", torch.device("cuda"), *ARGS).name == "torch"


def test_selector_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_attention_backend("triton", torch.device("cpu"), *ARGS).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        get_attention_backend("triton", torch.device("cpu"), *ARGS)


def test_selector_missing_triton(monkeypatch):
    real = selector._missing_module
    monkeypatch.setattr(selector, "_missing_module",
                        lambda m: "the python package 'triton' is not installed"
                        if m == "triton" else real(m))
    with pytest.raises(ValueError, match="'triton' is not installed"):
        get_attention_backend("triton", device(), *ARGS)
    # auto never fails: without Triton it is the torch reference, on any device.
    assert get_attention_backend("auto", device(), *ARGS).name == "torch"


@pytest.mark.parametrize("name,package", [("flash_attn", "flash_attn"),
                                          ("flashinfer", "flashinfer")])
def test_selector_missing_or_unsupported(name, package):
    # On the CPU these always refuse (CUDA only); on CUDA they refuse when not installed.
    if torch.cuda.is_available() and _has(package):
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ValueError, match=f"'{name}' is not usable"):
        get_attention_backend(name, device(), *ARGS)


@pytest.mark.skipif(not torch.cuda.is_available() or not _has("flash_attn"),
                    reason="needs CUDA and flash-attn")
def test_flash_attn_refuses_small_pages():
    with pytest.raises(ValueError, match="multiple of 256"):
        get_attention_backend("flash_attn", torch.device("cuda"), *ARGS)


def test_triton_backend_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        get_attention_backend("triton", device(), 8, 2, 96, 0.1, 16)


def _backend_classes():
    from pagedserve.attention.flash_attn_backend import FlashAttnBackend
    from pagedserve.attention.flashinfer_backend import FlashInferBackend
    from pagedserve.attention.triton_backend import TritonAttentionBackend

    return [TorchAttentionBackend, TritonAttentionBackend, FlashAttnBackend, FlashInferBackend]


def test_every_backend_states_whether_graphs_can_replay_it():
    classes = _backend_classes()
    assert {cls.name for cls in classes} == set(selector.ATTENTION_BACKENDS) - {"auto"}
    for cls in classes:
        assert "cuda_graph_safe" in vars(cls), f"{cls.__name__} must say cuda_graph_safe"
    assert {cls.name for cls in classes if cls.cuda_graph_safe} == {"triton"}


def test_the_runner_replays_only_graph_safe_backends():
    from pagedserve.worker.cuda_graphs import graphs_unusable

    cuda = torch.device("cuda")  # only named: the decision needs no device
    triton_backend = get_attention_backend("triton", device(), *ARGS)
    torch_backend = TorchAttentionBackend(*ARGS)
    assert graphs_unusable(cuda, False, triton_backend) is None
    assert "'torch' attention backend" in graphs_unusable(cuda, False, torch_backend)
    assert "enforce_eager" in graphs_unusable(cuda, True, triton_backend)
    assert "CUDA device" in graphs_unusable(torch.device("cpu"), False, triton_backend)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp-kernel", "gather"])
def test_torch_backend_runs_short_continuations_as_decodes(use_kernel, monkeypatch):
    """A request's few query rows after a cached context (a decode verifying drafts) run as
    one decode per row, with the results of causal SDPA over the gathered context."""
    from pagedserve.attention import torch_backend

    q_lens, ctx_lens = [1, 5, 17, 18, 3, 4], [40, 31, 100, 20, 0, 9]
    b, key, value, meta = _step(q_lens, ctx_lens, (8, 2), 32, 16, torch.float32, 0)
    outs = []
    for max_rows in (torch_backend._MAX_DECODE_ROWS, 1):
        monkeypatch.setattr(torch_backend, "_MAX_DECODE_ROWS", max_rows)
        backend = TorchAttentionBackend(8, 2, 32, 32 ** -0.5, 16)
        if not use_kernel:
            monkeypatch.setattr(backend, "_kernel_for", lambda cache, dtype: None)
        m = AttentionMetadata(**{**meta.__dict__, "plan": None})
        backend.prepare(m)
        if max_rows > 1:  # the rows of 1, 5, 17 and 4 queries; 18 is too many, 3 is a prompt
            assert m.plan.num_decodes == 1 + 5 + 17 + 4
            assert [p.end - p.start for p in m.plan.prefills] == [18, 3]
        outs.append(backend.forward(b.query, key, value, b.kv_cache.clone(), m))
    n = b.num_actual_tokens
    assert_close(outs[0][:n], outs[1][:n], torch.float32, what="decode rows")


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 5, 17, 4, 2], [40, 31, 100, 9, 3]),  # decodes verifying drafts, a drafter's catch-up
    ([1, 1, 1, 1], [0, 17, 300, 64]),  # plain decodes
], ids=["verifying", "decoding"])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp-kernel", "gather"])
def test_torch_backend_plans_all_decode_forwards_on_the_host(q_lens, ctx_lens, use_kernel,
                                                            monkeypatch):
    """A forward of decodes only (the host-side plan that skips the general analysis) gives
    what the same rows give through causal SDPA over their context."""
    from pagedserve.attention import torch_backend

    b, key, value, meta = _step(q_lens, ctx_lens, (8, 2), 32, 16, torch.float32, 0)
    outs, caches = [], []
    for max_rows in (torch_backend._MAX_DECODE_ROWS, 0):  # 0: every row through SDPA
        monkeypatch.setattr(torch_backend, "_MAX_DECODE_ROWS", max_rows)
        backend = TorchAttentionBackend(8, 2, 32, 32 ** -0.5, 16)
        if not use_kernel:
            monkeypatch.setattr(backend, "_kernel_for", lambda cache, dtype: None)
        m = AttentionMetadata(**{**meta.__dict__, "plan": None})
        backend.prepare(m)
        if max_rows:
            assert m.plan.num_decodes == sum(q_lens) and not m.plan.prefills
        else:  # single rows stay decodes
            assert m.plan.num_decodes == q_lens.count(1)
        cache = b.kv_cache.clone()
        outs.append(backend.forward(b.query, key, value, cache, m))
        caches.append(cache)
    n = b.num_actual_tokens
    assert torch.equal(caches[0], caches[1])
    assert_close(outs[0][:n], outs[1][:n], torch.float32, what="decode rows")
