"""Tensor parallelism's model pieces (issue 12): the four architectures and several quantized
checkpoints split over 2 gloo ranks (spawned processes, on the CPU) give the same greedy
tokens as one rank, and logits that agree within fp32 summation-order error, through a
chunked prefill and decode steps on the paged KV cache; each weight format's rank parts make
the whole layer (W8A8 too, within quantization error where activations are scaled per token);
and what cannot be split fails naming why.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tensor_parallel_ranks import greedy_run, rank_main

from pagedserve.devtools.quantized_model import write_quantized
from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup
from pagedserve.executor.multi_rank import free_port
from pagedserve.layers.linear import LinearBase
from pagedserve.layers.quantization.w8a8_linear import W8A8LinearMethod, W8A8Scheme
from pagedserve.models.loader import load_model
from pagedserve.models.model_config import ModelConfig

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "quant"
WORLD = 2
# A rank that waits longer than this on a collective, or a run longer than this in all,
# fails the test instead of hanging it.
COLLECTIVE_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240
# fp32 on both sides; the row-parallel sums add the ranks' partial products in another
# order than one matmul does: measured differences are ~1e-6 of the logits' scale.
RTOL, ATOL = 1e-4, 1e-4

# Each architecture with what its split exercises: llama with biases on every projection (a
# row-parallel bias is added once); mistral with a single KV head (replicated on both ranks);
# qwen2 with q/k/v biases, tied embeddings and a vocabulary that does not divide by the ranks
# (the last rank's rows padded); qwen3 with per-head q/k norms.
ARCHS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(num_key_value_heads=1),
    "qwen2": dict(vocab_size=1031),
    "qwen3": dict(),
}
# Producers' checkpoints: a group-wise GPTQ v2 (asymmetric, g64: each rank whole groups of
# down_proj's and o_proj's inputs, g_idx renumbered) and compressed-tensors' pack-quantized
# with one scale per channel (every rank the whole scales).
QUANTIZED = ("gptq-v2-4bit-g64-asym", "ct-w4a16-channel-sym")
# Checkpoints written here from the tiny llama (devtools.quantized_model): AWQ (values packed
# along N, groups along K), and 8-bit channel-wise GPTQ with a quantized LM head (a
# column-parallel linear whose logits are gathered). id -> (format, config, packer options)
WRITTEN = {
    "awq-g32": ("awq", {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                        "version": "gemm"}, dict(bits=4, group_size=32, sym=False)),
    "gptq-8bit-channel-lm_head": (
        "gptq", {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True,
                 "desc_act": False, "lm_head": True},
        dict(bits=8, group_size=-1, sym=True, quantize_lm_head=True)),
}


def _run_ranks(model_dirs: list[str], out_dir: pathlib.Path) -> list[dict]:
    """Runs greedy_run on WORLD spawned gloo ranks; returns each rank's results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main,
                         args=(rank, WORLD, port, model_dirs, str(out_dir), COLLECTIVE_TIMEOUT_S))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(RUN_TIMEOUT_S)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"rank(s) {hung} still running after {RUN_TIMEOUT_S} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = {rank: (out_dir / f"rank{rank}.err").read_text()
              for rank in range(WORLD) if (out_dir / f"rank{rank}.err").exists()}
    assert not errors, errors
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"rank exit codes {codes}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _check_collectives(ranks: list[dict]) -> None:
    # Rank r contributed a [2, 3] tensor of r + 1.
    parts = [torch.full((2, 3), float(r + 1)) for r in range(WORLD)]
    for results in ranks:
        got = results["collectives"]
        torch.testing.assert_close(got["all_reduce"], sum(parts))
        torch.testing.assert_close(got["all_gather_0"], torch.cat(parts, dim=0))
        torch.testing.assert_close(got["all_gather_1"], torch.cat(parts, dim=1))


def test_two_ranks_match_one(tiny_model_dir, tmp_path):
    dirs = [str(tiny_model_dir(arch, **kwargs)) for arch, kwargs in ARCHS.items()]
    for name in QUANTIZED:  # without the logits the fixture records (not a weight file)
        shutil.copytree(FIXTURES / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("reference_logits*"))
        dirs.append(str(tmp_path / name))
    for name, (fmt, config, options) in WRITTEN.items():
        write_quantized(tiny_model_dir("llama"), tmp_path / name, tmp_path / f"{name}-twin",
                        fmt, config, **options)
        dirs.append(str(tmp_path / name))
    ranks = _run_ranks(dirs, tmp_path)
    _check_collectives(ranks)
    torch.set_num_threads(1)
    for model_dir in dirs:
        want = greedy_run(model_dir)
        for rank, results in enumerate(ranks):
            tokens, logits = results[model_dir]
            where = f"{pathlib.Path(model_dir).name}, rank {rank}"
            assert tokens == want.tokens, where
            for got, ref in zip(logits, want.logits):
                assert got.shape == ref.shape, where
                scale = float(ref.abs().max())
                torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL * scale, msg=where)


# ---- one layer's rank parts against the whole layer, in-process (no collective: the partial
# outputs are put together here), for each int weight format ------------------------------

LAYER_CASES = {
    "unquantized": None,
    # Act order is fine column-parallel (every rank all the inputs): the q/k/v check only.
    "gptq-4bit-g32-sym-desc_act": ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                            "sym": True, "desc_act": True},
                                   dict(bits=4, group_size=32, sym=True, act_order=True)),
    "gptq_v2-8bit-g32-asym": ("gptq_v2", {"quant_method": "gptq", "bits": 8, "group_size": 32,
                                          "sym": False, "checkpoint_format": "gptq_v2"},
                              dict(bits=8, group_size=32, sym=False)),
    "awq-g32": WRITTEN["awq-g32"],
    "pack_quantized-g32-asym": (
        "pack_quantized",
        {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"g": {"targets": ["Linear"], "input_activations": None,
                                 "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                             "strategy": "group", "group_size": 32}}},
         "ignore": ["lm_head"]},
        dict(bits=4, group_size=32, sym=False)),
}


def _layer(path: pathlib.Path, prefix: str, shards: dict[str, object], sizes: list[int],
           input_size: int, tp: TensorParallelGroup, parallel: str) -> LinearBase:
    """``prefix``'s layer (merging checkpoint modules ``shards``: name -> shard id) on ``tp``'s
    rank, loaded from ``path``."""
    config = ModelConfig.from_pretrained(path)
    parent = prefix.rpartition(".")[0]
    method = (config.quant_config.linear_method(prefix, [f"{parent}.{n}" for n in shards])
              if config.quant_config is not None else None)
    layer = LinearBase(input_size, sizes, shard_names=list(shards.values()), prefix=prefix,
                       linear_method=method, dtype=torch.float32, tp=tp, parallel=parallel)
    params = dict(layer.named_parameters())
    for name, tensor in load_file(path / "model.safetensors").items():
        module, _, leaf = name.rpartition(".")
        ckpt = module.rpartition(".")[2]
        if module.rpartition(".")[0] == parent and ckpt in shards:
            params[leaf].weight_loader(params[leaf], tensor, shards[ckpt])
    layer.linear_method.process_weights_after_loading(layer)
    return layer.eval()


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_rank_parts_make_the_whole_layer(tiny_model_dir, tmp_path, case):
    path = tiny_model_dir("llama")  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 128
    if LAYER_CASES[case] is not None:
        fmt, config, options = LAYER_CASES[case]
        write_quantized(path, tmp_path / "q", tmp_path / "twin", fmt, config, **options)
        path = tmp_path / "q"
    torch.manual_seed(0)
    ranks = [TensorParallelGroup(r, WORLD) for r in range(WORLD)]
    qkv = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
    x = torch.randn(5, 64)
    with torch.inference_mode():
        whole = _layer(path, "model.layers.0.self_attn.qkv_proj", qkv, [64, 32, 32], 64,
                       SINGLE_RANK, "column")(x).split([64, 32, 32], dim=-1)
        parts = [_layer(path, "model.layers.0.self_attn.qkv_proj", qkv, [64, 32, 32], 64, tp,
                        "column")(x).split([32, 16, 16], dim=-1) for tp in ranks]
    for i, want in enumerate(whole):  # each shard: the ranks' columns side by side
        got = torch.cat([p[i] for p in parts], dim=-1)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()))
    if "desc_act" in case:
        return
    down = {"down_proj": None}
    h = torch.randn(5, 128)
    with torch.inference_mode():
        want = _layer(path, "model.layers.0.mlp.down_proj", down, [64], 128, SINGLE_RANK,
                      "row")(h)
        got = sum(layer.linear_method.apply(layer, h[:, tp.rank * 64:(tp.rank + 1) * 64], None)
                  for tp in ranks
                  for layer in [_layer(path, "model.layers.0.mlp.down_proj", down, [64], 128,
                                       tp, "row")])
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()))


# W8A8 producers' checkpoints (hidden 128, 2 heads of 64, intermediate 384) -> the bound on
# the rank parts against the whole layer (absolute, times the output's largest value). Static
# activations (one calibrated scale) are quantized exactly as on one rank: summation order
# only. Per token, a row-parallel rank scales each token over its own inputs (see
# W8A8LinearMethod), which moves each product by up to half a quantization step: 1/254 of a
# token's largest input for int8, 1/16 of each value for fp8 e4m3's 3 mantissa bits.
W8A8_FIXTURES = {
    "ct-w8a8-int-static": ATOL,
    "ct-fp8-static": ATOL,
    "fp8-native-tensor-static": ATOL,
    "ct-w8a8-int-dynamic": 2e-2,
    "fp8-native-tensor-dynamic": 6e-2,
}


def _row_parallel_sum(make_layer: Callable[[TensorParallelGroup], LinearBase],
                      x: torch.Tensor, ranks: list[TensorParallelGroup]) -> torch.Tensor:
    """A row-parallel layer's output: each rank's layer on its share of ``x``'s columns,
    summed over the ranks (what the all-reduce does)."""
    share = x.shape[-1] // len(ranks)
    out = torch.zeros(())
    for tp in ranks:
        layer = make_layer(tp)
        out = out + layer.linear_method.apply(layer, x[:, tp.rank * share:(tp.rank + 1) * share],
                                              None)
    return out


def _check_rank_parts(path: pathlib.Path, qkv_sizes: list[int], hidden: int,
                      intermediate: int, rtol: float, atol: float) -> None:
    """Rank 0's and rank 1's q/k/v (column-parallel) and down_proj (row-parallel) parts of
    ``path``'s layer 0, put together, against the whole layers on the same inputs."""
    torch.manual_seed(0)
    ranks = [TensorParallelGroup(r, WORLD) for r in range(WORLD)]
    qkv = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
    x = torch.randn(5, hidden)
    prefix = "model.layers.0.self_attn.qkv_proj"
    with torch.inference_mode():
        whole = _layer(path, prefix, qkv, qkv_sizes, hidden, SINGLE_RANK, "column")(x)
        parts = [_layer(path, prefix, qkv, qkv_sizes, hidden, tp, "column")(x) for tp in ranks]
    halves = [size // WORLD for size in qkv_sizes]
    for i, want in enumerate(whole.split(qkv_sizes, dim=-1)):
        got = torch.cat([p.split(halves, dim=-1)[i] for p in parts], dim=-1)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()))
    down = {"down_proj": None}
    h = torch.randn(5, intermediate)
    with torch.inference_mode():
        want = _layer(path, "model.layers.0.mlp.down_proj", down, [hidden], intermediate,
                      SINGLE_RANK, "row")(h)
        got = _row_parallel_sum(
            lambda tp: _layer(path, "model.layers.0.mlp.down_proj", down, [hidden],
                              intermediate, tp, "row"), h, ranks)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()))


@pytest.mark.parametrize("fixture", list(W8A8_FIXTURES))
def test_w8a8_rank_parts_make_the_whole_layer(fixture):
    atol = W8A8_FIXTURES[fixture]
    _check_rank_parts(FIXTURES / fixture, [128, 128, 128], 128, 384,
                      RTOL if atol == ATOL else 0.0, atol)


def test_w8a8_per_token_split_is_not_exact():
    """The per-token cases' looser bounds are needed: the tight one fails (so the static cases
    pass it because they are exact, not because the check cannot tell)."""
    with pytest.raises(AssertionError):
        _check_rank_parts(FIXTURES / "ct-w8a8-int-dynamic", [128, 128, 128], 128, 384,
                          RTOL, ATOL)


def _block_fp8_layer(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                     tp: TensorParallelGroup, parallel: str) -> LinearBase:
    scheme = W8A8Scheme(torch.float8_e4m3fn, "block", "group", block=block,
                        scale_name="weight_scale_inv")
    layer = LinearBase(weight.shape[1], [weight.shape[0]], linear_method=W8A8LinearMethod(scheme),
                       dtype=torch.float32, tp=tp, parallel=parallel, prefix="block")
    for name, tensor in (("weight", weight), ("weight_scale_inv", scales)):
        param = getattr(layer, name)
        param.weight_loader(param, tensor, None)
    layer.linear_method.process_weights_after_loading(layer)
    return layer


def test_block_fp8_rank_parts_make_the_whole_layer():
    """Block scales go with their blocks: a [256, 512] weight in blocks of 64 x 128, split by
    rows (column-parallel: 2 block rows a rank) and by columns (row-parallel: 2 block columns
    a rank, whole activation groups of 128)."""
    torch.manual_seed(0)
    weight = (torch.randn(256, 512) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(4, 4) / 100 + 1e-3
    x = torch.randn(3, 512)
    ranks = [TensorParallelGroup(r, WORLD) for r in range(WORLD)]
    with torch.inference_mode():
        want = _block_fp8_layer(weight, scales, (64, 128), SINGLE_RANK, None)(x)
        columns = torch.cat([_block_fp8_layer(weight, scales, (64, 128), tp, "column")(x)
                             for tp in ranks], dim=-1)
        rows = _row_parallel_sum(
            lambda tp: _block_fp8_layer(weight, scales, (64, 128), tp, "row"), x, ranks)
    scale = float(want.abs().max())
    torch.testing.assert_close(columns, want, rtol=RTOL, atol=ATOL * scale)
    torch.testing.assert_close(rows, want, rtol=RTOL, atol=ATOL * scale)


# ---- what cannot be split: refused at load, naming why (no collective runs while loading, so
# a group that claims two ranks without torch.distributed shows the errors in-process) -----


def _load_as_rank(path: pathlib.Path, world: int = WORLD) -> torch.nn.Module:
    from pagedserve.attention.torch_backend import TorchAttentionBackend

    config = ModelConfig.from_pretrained(path).with_tensor_parallel(world)
    attn = TorchAttentionBackend(config.heads_per_rank, config.kv_heads_per_rank,
                                 config.head_dim, config.head_dim ** -0.5, 4)
    return load_model(config, torch.float32, torch.device("cpu"), attn, config.quant_config,
                      tp=TensorParallelGroup(0, world))


@pytest.mark.parametrize("field,kwargs,world", [
    ("num_attention_heads", dict(num_attention_heads=6, num_key_value_heads=2,
                                 hidden_size=48), 4),
    ("num_key_value_heads", dict(num_attention_heads=6, num_key_value_heads=3,
                                 hidden_size=48), 2),
    ("intermediate_size", dict(intermediate_size=130), 4),
])
def test_shapes_that_do_not_divide(tiny_model_dir, field, kwargs, world):
    config = ModelConfig.from_pretrained(tiny_model_dir("llama", **kwargs))
    with pytest.raises(ValueError, match=f"tensor_parallel_size {world} .*{field}"):
        config.with_tensor_parallel(world)


def test_per_rank_heads(tiny_model_dir):
    config = ModelConfig.from_pretrained(tiny_model_dir("llama"))  # 4 heads, 2 KV heads
    assert (config.heads_per_rank, config.kv_heads_per_rank) == (4, 2)
    two = config.with_tensor_parallel(2)
    assert (two.heads_per_rank, two.kv_heads_per_rank, two.kv_head_replicas) == (2, 1, 1)
    four = config.with_tensor_parallel(4)
    assert (four.heads_per_rank, four.kv_heads_per_rank, four.kv_head_replicas) == (1, 1, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        config.with_tensor_parallel(0)


def test_config_and_group_must_agree(tiny_model_dir):
    config = ModelConfig.from_pretrained(tiny_model_dir("llama"))
    from pagedserve.attention.torch_backend import TorchAttentionBackend

    attn = TorchAttentionBackend(4, 2, config.head_dim, 1.0, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size 1, the group has 2"):
        load_model(config, torch.float32, torch.device("cpu"), attn,
                   tp=TensorParallelGroup(0, 2))


@pytest.mark.parametrize("fixture,match", [
    ("gptq-v1-4bit-g32-asym-descact", r"o_proj: act order \(quantization_config.desc_act\) "
                                      r"across a row-parallel split"),
    # o_proj's 128 inputs: 64 per rank, half a group of 128.
    ("gptq-v1-4bit-g128-sym", r"o_proj: each rank's 64 inputs .* not a whole number of "
                              r"quantization groups \(group_size 128\)"),
    # o_proj's 128 inputs: 64 per rank, half a weight block of 128 x 128.
    ("fp8-native-block", r"o_proj: input size 64 \(each rank's share, tensor_parallel_size 2\) "
                         r"is not a multiple of the weight block's 128 columns"),
])
def test_unsplittable_checkpoints_are_refused(fixture, match):
    with pytest.raises(ValueError, match=match):
        _load_as_rank(FIXTURES / fixture)


def test_act_order_g_idx_under_a_config_without_desc_act_is_refused(tiny_model_dir, tmp_path):
    """The config says no act order, but the checkpoint's g_idx sends a rank's inputs to groups
    that another rank holds: caught when the rank's g_idx is renumbered."""
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
              "desc_act": False, "lm_head": False}
    write_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "twin", "gptq", config,
                    bits=4, group_size=32, sym=True, act_order=True)
    with pytest.raises(ValueError, match=r"down_proj.g_idx': maps rank 0's inputs to groups of "
                                         r"other ranks: act order"):
        _load_as_rank(tmp_path / "q")


def test_single_rank_collectives_are_the_identity():
    x = torch.randn(3, 5)
    assert SINGLE_RANK.all_reduce(x) is x
    assert SINGLE_RANK.all_gather(x, dim=0) is x
    with pytest.raises(ValueError, match="rank 2"):
        TensorParallelGroup(2, 2)
