"""The committed quantized fixtures (tests/fixtures/quant/, made by scripts/make_quant_fixtures.sh)
are what the format notes (shared/reference/quantization.md) say: the tensors have the documented
names, dtypes and shapes; dequantizing them by the documented formulas gives back weights close
to the base model's; and transformers on those weights reproduces the logits that each producer's
own loader recorded. The unpackers here are deliberately tiny, independent re-statements of the
formats, not the engine's loaders (which are tested against these fixtures on their own)."""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Dict, Optional

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "quant"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
BUILT = sorted(
    name for name, entry in MANIFEST["fixtures"].items()
    if name != "base" and "failed" not in entry
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Round-to-nearest over a group of Gaussian weights leaves a relative RMS error of about
# (2 * absmax / (2^b - 1)) / sqrt(12) / std: ~0.1 at 4 bits, ~0.006 at 8. GPTQ's error
# compensation moves individual weights further (it minimizes the layer's output error, not
# the weights'): measured up to ~0.2 at 4 bits here. e4m3 keeps 3 mantissa bits: ~0.027.
MAX_REL_ERROR = {"int4": 0.25, "int8": 0.03, "fp8": 0.04}
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (little end first) -> [R * 32/bits, C]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 (little end first) -> [R, C * 32/bits]."""
    return unpack_rows(packed.t().contiguous(), bits).t()


def gptq_weight(t: Dict[str, torch.Tensor], prefix: str, q: dict, base_k: int) -> torch.Tensor:
    bits, group = q["bits"], q["group_size"]
    qweight, qzeros, scales = (t[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales"))
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert scales.dtype == torch.float16
    per_word = 32 // bits
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    assert k == base_k
    num_groups = 1 if group == -1 else k // group
    assert tuple(qzeros.shape) == (num_groups, n // per_word)
    assert tuple(scales.shape) == (num_groups, n)
    g_idx = t.get(f"{prefix}.g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // (k if group == -1 else group)
    else:
        assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (k,)
        g_idx = g_idx.long()
    weights = unpack_rows(qweight, bits).float()
    zeros = unpack_cols(qzeros, bits).float()
    if q.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    if q.get("sym", True):
        assert torch.all(zeros == 2 ** (bits - 1)), "a symmetric checkpoint has the mid zero"
    return (scales.float()[g_idx] * (weights - zeros[g_idx])).t()


def awq_weight(t: Dict[str, torch.Tensor], prefix: str, q: dict, base_k: int) -> torch.Tensor:
    group = q["group_size"]
    qweight, qzeros, scales = (t[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales"))
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
    k, n = qweight.shape[0], qweight.shape[1] * 8
    assert k == base_k
    assert tuple(qzeros.shape) == (k // group, n // 8) and tuple(scales.shape) == (k // group, n)
    assert f"{prefix}.g_idx" not in t

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32) * 4
        return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)

    g_idx = torch.arange(k) // group
    weights, zeros = unpack(qweight).float(), unpack(qzeros).float()
    return (scales.float()[g_idx] * (weights - zeros[g_idx])).t()


def expand_scale(scale: torch.Tensor, shape: torch.Size,
                 block: Optional[list] = None) -> torch.Tensor:
    """A per-tensor, per-channel, per-group or per-block scale broadcast to the weight's shape."""
    n, k = shape
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(n, k)
    if block is not None:
        bn, bk = block
        assert tuple(scale.shape) == (-(-n // bn), -(-k // bk))
        return scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    assert scale.shape[0] == n and k % scale.shape[1] == 0
    return scale.repeat_interleave(k // scale.shape[1], 1)


def ct_weight(t: Dict[str, torch.Tensor], prefix: str, q: dict, base_k: int) -> torch.Tensor:
    (group,) = q["config_groups"].values()
    spec = group["weights"]
    bits, fmt = spec["num_bits"], q["format"]
    block = spec.get("block_structure")
    scale = t[f"{prefix}.weight_scale"]
    if fmt == "pack-quantized":
        packed = t[f"{prefix}.weight_packed"]
        n, k = t[f"{prefix}.weight_shape"].tolist()
        assert packed.dtype == torch.int32 and k == base_k
        assert tuple(packed.shape) == (n, -(-k * bits // 32))
        offset = 2 ** (bits - 1)  # stored unsigned: q + 2^(b-1)
        weights = unpack_cols(packed, bits)[:, :k].float() - offset
        if spec["strategy"] == "group":
            assert tuple(scale.shape) == (n, k // spec["group_size"])
        else:
            assert tuple(scale.shape) == (n, 1)
        zeros = torch.zeros(1, 1)
        if not spec["symmetric"]:
            packed_zeros = t[f"{prefix}.weight_zero_point"]
            assert packed_zeros.dtype == torch.int32
            assert tuple(packed_zeros.shape) == (-(-n * bits // 32), scale.shape[1])
            zeros = unpack_rows(packed_zeros, bits)[:n].float() - offset
            zeros = expand_scale(zeros, torch.Size((n, k)))
        assert f"{prefix}.weight_g_idx" not in t  # c-t 0.19 writes no act-order g_idx
        return expand_scale(scale, torch.Size((n, k))) * (weights - zeros)
    weight = t[f"{prefix}.weight"]
    expected = {"int-quantized": torch.int8, "float-quantized": torch.float8_e4m3fn}[fmt]
    assert weight.dtype == expected and weight.shape[1] == base_k
    if spec["strategy"] == "channel":
        assert tuple(scale.shape) == (weight.shape[0], 1)
    elif spec["strategy"] == "tensor":
        assert scale.numel() == 1
    activations = group.get("input_activations") or {}
    if activations and activations.get("dynamic") is False:  # static: a calibrated input scale
        assert float(t[f"{prefix}.input_scale"].float().max()) > 0
    return weight.float() * expand_scale(scale, weight.shape, block)


def fp8_native_weight(t: Dict[str, torch.Tensor], prefix: str, q: dict,
                      base_k: int) -> torch.Tensor:
    weight = t[f"{prefix}.weight"]
    assert weight.dtype == torch.float8_e4m3fn and weight.shape[1] == base_k
    if "weight_block_size" in q:
        scale = t[f"{prefix}.weight_scale_inv"]
        assert scale.dtype == torch.float32
        return weight.float() * expand_scale(scale, weight.shape, q["weight_block_size"])
    scale = t[f"{prefix}.weight_scale"]
    assert scale.dtype == torch.float32 and scale.numel() == 1
    if q["activation_scheme"] == "static":
        input_scale = t[f"{prefix}.input_scale"]
        assert input_scale.dtype == torch.float32 and input_scale.numel() == 1
        assert float(input_scale) > 0
    return weight.float() * scale.float()


def dequantizer(q: dict) -> Callable[..., torch.Tensor]:
    method = q["quant_method"]
    if method == "gptq":
        return gptq_weight
    if method == "awq":
        return awq_weight
    if method == "compressed-tensors":
        return ct_weight
    if method == "fp8":
        return fp8_native_weight
    if method in ("auto-round", "intel/auto-round"):
        return awq_weight if q["packing_format"].endswith("auto_awq") else gptq_weight
    raise AssertionError(f"unknown quant_method {method}")


def layer_bits(q: dict, prefix: str, default: int) -> int:
    """AutoRound's extra_config overrides bits per layer (>= 16: not quantized)."""
    for name, override in (q.get("extra_config") or {}).items():
        if prefix.endswith(name) or name == prefix:
            return override.get("bits", default)
    return default


def is_float8(tensors: Dict[str, torch.Tensor], prefix: str) -> bool:
    weight = tensors.get(f"{prefix}.weight")
    return weight is not None and weight.dtype == torch.float8_e4m3fn


@pytest.fixture(scope="module")
def base_weights() -> Dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "base" / "model.safetensors"))


def test_the_manifest_lists_every_fixture_directory():
    on_disk = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert on_disk == set(BUILT) | {"base"}
    assert len(BUILT) >= 3


@pytest.mark.parametrize("name", BUILT)
def test_the_manifest_says_how_each_fixture_was_made(name):
    entry = MANIFEST["fixtures"][name]
    for field_name in ("producer", "producer_version", "format", "bits", "group_size", "sym",
                       "desc_act", "ignored", "quantization_config", "reference_logits"):
        assert field_name in entry, f"{name}: {field_name}"
    has_logits = (FIXTURES / name / "reference_logits.safetensors").exists()
    assert has_logits == entry["reference_logits"]
    if not has_logits:
        assert entry["reference_logits_note"]


@pytest.mark.parametrize("name", BUILT)
def test_dequantized_weights_match_the_base_model(name, base_weights):
    entry = MANIFEST["fixtures"][name]
    config = json.loads((FIXTURES / name / "config.json").read_text())
    q = config["quantization_config"]
    tensors = load_file(str(FIXTURES / name / "model.safetensors"))
    dequantize = dequantizer(q)
    default_bits = entry["bits"]
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        # A producer may keep the model in another dtype (AutoRound: bf16 on the CPU).
        kept = tensors[key]
        assert torch.equal(kept, base_weights[key].to(kept.dtype)), f"{key} must stay unquantized"
    checked = 0
    for key, original in base_weights.items():
        if not any(f".{linear}.weight" in key for linear in LINEARS):
            continue
        prefix = key[: -len(".weight")]
        bits = layer_bits(q, prefix, default_bits)
        if bits >= 16:
            kept = tensors[key]
            assert torch.equal(kept, original.to(kept.dtype)), f"{prefix} is left at 16 bits"
            continue
        weight = dequantize(tensors, prefix, q, original.shape[1])
        assert weight.shape == original.shape, prefix
        error = (weight - original.float()).norm() / original.float().norm()
        bound = MAX_REL_ERROR["fp8" if is_float8(tensors, prefix) else f"int{bits}"]
        assert error < bound, f"{prefix}: relative error {error:.4f}"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", [n for n in BUILT if MANIFEST["fixtures"][n].get(
    "reference_logits")])
def test_reference_logits_are_fp32_per_prompt(name):
    tensors = load_file(str(FIXTURES / name / "reference_logits.safetensors"))
    vocab = json.loads((FIXTURES / "base" / "config.json").read_text())["vocab_size"]
    prompts = [k for k in tensors if k.startswith("input_ids_")]
    assert len(prompts) >= 2
    for key in prompts:
        logits = tensors[key.replace("input_ids_", "logits_")]
        assert logits.dtype == torch.float32
        assert tuple(logits.shape) == (tensors[key].numel(), vocab)
        assert torch.isfinite(logits).all()


def dequantized_state_dict(name: str, base: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    q = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(FIXTURES / name / "model.safetensors"))
    state = {}
    for key, original in base.items():
        prefix = key[: -len(".weight")]
        if any(f".{linear}.weight" in key for linear in LINEARS) and layer_bits(
                q, prefix, MANIFEST["fixtures"][name]["bits"]) < 16:
            state[key] = dequantizer(q)(tensors, prefix, q, original.shape[1])
        else:
            state[key] = tensors[key].float()
    return state


def activation_quantizer(q: dict, tensors: Dict[str, torch.Tensor], prefix: str):
    """The input quantize-dequantize of a format that quantizes activations too (compressed-
    tensors' input_activations; native FP8 is never given reference logits), or None."""
    if q["quant_method"] != "compressed-tensors":
        return None
    (group,) = q["config_groups"].values()
    spec = group.get("input_activations")
    if not spec:
        return None
    is_float = spec["type"] == "float"
    # compressed-tensors' symmetric scale is absmax / (half the range): 448, and 255/2 for int8.
    top = torch.finfo(torch.float8_e4m3fn).max if is_float else 127.5
    static_scale = None if spec["dynamic"] else tensors[f"{prefix}.input_scale"].float()

    def rounded(x: torch.Tensor) -> torch.Tensor:
        if is_float:
            return x.clamp(-top, top).to(torch.float8_e4m3fn).float()
        return x.round().clamp(-128, 127)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if static_scale is not None:
            return rounded(x / static_scale) * static_scale
        if spec["strategy"] == "group":  # per token and group of K
            grouped = x.reshape(*x.shape[:-1], -1, spec["group_size"])
            scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
            return (rounded(grouped / scale) * scale).reshape(x.shape)
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top  # per token
        return rounded(x / scale) * scale

    return quantize


@pytest.mark.parametrize("name", [n for n in BUILT if MANIFEST["fixtures"][n].get(
    "reference_logits")])
def test_producer_logits_match_transformers_on_the_dequantized_weights(name, base_weights):
    """The producer's own loader and fp32 transformers on our dequantized weights (and our
    quantize-dequantize of the inputs where the format quantizes activations) agree: the
    fixture's tensors mean what the formulas above say. The tiny model amplifies weight
    rounding (4-bit weights move its logits by ~40%), so a wrong reading would not pass."""
    from transformers import AutoConfig, AutoModelForCausalLM

    q = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(FIXTURES / name / "model.safetensors"))
    config = AutoConfig.from_pretrained(FIXTURES / "base")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(dequantized_state_dict(name, base_weights))
    quantizes_activations = False
    for module_name, module in model.named_modules():
        quantize = module_name.startswith("model.layers.") and isinstance(
            module, torch.nn.Linear) and activation_quantizer(q, tensors, module_name)
        if quantize:
            quantizes_activations = True
            module.register_forward_pre_hook(lambda _m, args, f=quantize: (f(args[0]),))
    reference = load_file(str(FIXTURES / name / "reference_logits.safetensors"))
    # GPTQModel's torch kernel computes in fp16 only: its activations carry fp16 rounding.
    bound = {"float32": 1e-3, "float16": 2e-2}[MANIFEST["fixtures"][name][
        "reference_logits_dtype"]]
    # Rounding activations is not continuous: an activation on a rounding boundary lands on
    # either side as fp32 sums are ordered by this CPU's kernels (AVX2 against the producer's
    # AVX-512), and one such flip moved one position's logits by 0.7%. So one position per
    # input may be off, by a flip's size at most; a wrong reading moves every position (with
    # no activation quantization at all, 17 of 17 by 4-22%).
    positions_off, flip_bound = (1, 2e-2) if quantizes_activations else (0, bound)
    for key in (k for k in reference if k.startswith("input_ids_")):
        with torch.no_grad():
            logits = model(input_ids=reference[key].long()[None]).logits[0]
        expected = reference[key.replace("input_ids_", "logits_")]
        error = (logits - expected).abs().amax(-1) / expected.abs().max()
        assert int((error >= bound).sum()) <= positions_off, \
            f"{key}: max error {float(error.max()):.5f} at {int((error >= bound).sum())} positions"
        assert float(error.max()) < flip_bound, f"{key}: max error {float(error.max()):.5f}"
