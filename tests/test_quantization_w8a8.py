"""W8A8 formats (compressed-tensors int-quantized / float-quantized, native FP8, online FP8):
the producers' fixtures reproduce the producer's own logits, weights stay 8-bit in memory,
native FP8 checkpoints written by our fixture writer (fused shards with scales of their own)
match HF on the dequantized weights, online FP8 stays close to the unquantized model, and bad
configs fail naming the field. The greedy parity of every fixture is in test_quantization.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import assert_greedy_match, hf_greedy, load_hf_model
from safetensors.torch import load_file, save_file
from test_quantization import FIXTURES, PROMPTS, quantize_inputs

from pagedserve import LLM, SamplingParams
from pagedserve.layers.linear import LinearBase

MAX_TOKENS = 16
W8A8_FIXTURES = ["ct-fp8-block", "ct-fp8-dynamic", "ct-fp8-static", "ct-w8a8-int-dynamic",
                 "ct-w8a8-int-static"]


def _llm(path: Path, **kwargs: Any) -> LLM:
    return LLM(str(path), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=16 << 20,
               **kwargs)


def _checkpoint(name: str, tmp_path: Path) -> Path:
    checkpoint = tmp_path / name
    shutil.copytree(FIXTURES / name, checkpoint,
                    ignore=shutil.ignore_patterns("reference_logits*"))
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "base" / file, checkpoint / file)
    return checkpoint


def _w8a8_layers(llm: LLM) -> list[LinearBase]:
    return [m for m in llm.engine.runner.model.modules()
            if isinstance(m, LinearBase) and getattr(m, "w8a8", None) is not None]


@pytest.mark.parametrize("name", W8A8_FIXTURES)
def test_producer_logits_are_reproduced(name, tmp_path):
    """The engine's prompt logprobs against the producer's own (llm-compressor's forward on the
    fixture's prompts). Most positions agree to 1e-3; a rounding of one activation that falls
    the other way (inputs differing in the last fp32 bit) moves a few positions of this tiny
    random model far, so the bound is on the share of agreeing positions: quantizing dynamic
    int8 activations by absmax/127 (vLLM's rule) instead of the producer's absmax/127.5 leaves
    none within 1e-3."""
    reference = load_file(str(FIXTURES / name / "reference_logits.safetensors"))
    llm = _llm(_checkpoint(name, tmp_path))
    keys = [k for k in reference if k.startswith("input_ids_")]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": reference[k].long().tolist()} for k in keys],
                           params, use_tqdm=False)
    errors = []
    for key, output in zip(keys, outputs):
        expected = torch.log_softmax(reference[key.replace("input_ids_", "logits_")], -1)
        for i, entry in enumerate(output.prompt_logprobs[1:]):
            errors.append(max(abs(lp.logprob - float(expected[i, t])) for t, lp in entry.items()))
    errors = torch.tensor(errors)
    agreeing = float((errors < 1e-3).float().mean())
    assert agreeing >= 0.75 and float(errors.median()) < 1e-4, (agreeing, errors.tolist())


@pytest.mark.parametrize("name, dtype", [("ct-w8a8-int-static", torch.int8),
                                         ("ct-fp8-block", torch.float8_e4m3fn),
                                         ("fp8-native-tensor-static", torch.float8_e4m3fn)])
def test_weights_stay_8_bit_in_memory(name, dtype, tmp_path):
    llm = _llm(_checkpoint(name, tmp_path))
    layers = _w8a8_layers(llm)
    assert len(layers) == 4 * 2
    for layer in layers:
        assert layer.w8a8.qweight.dtype == dtype
        assert not any(p.dtype.is_floating_point and p.dim() == 2 and p.element_size() > 1
                       for p in layer.parameters())


def _native_fp8_writer():
    path = Path(__file__).parents[1] / "scripts" / "quant_fixtures" / "native_fp8.py"
    spec = importlib.util.spec_from_file_location("native_fp8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["tensor-static", "tensor-dynamic", "block"])
def test_native_fp8_written_checkpoint_matches_hf(mode, tmp_path):
    """The fixture writer's quantizers on the fixtures' base model: q, k and v (gate and up)
    get per-tensor weight scales of their own, and static input scales that differ per shard
    (each shard then quantizes the shared input with its own scale: exact, not requantized to
    the max)."""
    writer = _native_fp8_writer()
    base = FIXTURES / "base"
    dst = tmp_path / "fp8"
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(base / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not writer.is_quantized_linear(key):
            out[key] = value
            continue
        prefix = key[: -len(".weight")]
        if mode == "block":
            out[key], out[f"{prefix}.weight_scale_inv"] = writer.quantize_blocks(value)
        else:
            out[key], out[f"{prefix}.weight_scale"] = writer.quantize_per_tensor(value)
        if mode == "tensor-static":
            shard = sum(map(ord, prefix)) % 7  # a different calibrated scale per module
            out[f"{prefix}.input_scale"] = torch.tensor(0.02 + 0.005 * shard)
    save_file(out, str(dst / "model.safetensors"))
    quant = {"quant_method": "fp8", "activation_scheme": "static" if mode == "tensor-static"
             else "dynamic"}
    if mode == "block":
        quant["weight_block_size"] = [128, 128]
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))
    llm = _llm(dst)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
    layers = _w8a8_layers(llm)
    assert layers
    if mode == "tensor-static":
        assert any(len(layer.w8a8.input_scales) > 1 for layer in layers)
    twin = tmp_path / "twin"
    shutil.copytree(base, twin, ignore=shutil.ignore_patterns("*.safetensors"))
    state = dict(tensors)
    for layer in layers:
        parent, _, name = layer.prefix.rpartition(".")
        shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]}.get(name, [name])
        for shard, part in zip(shards, layer.w8a8.dense().split(layer.output_sizes)):
            state[f"{parent}.{shard}.weight"] = part.contiguous()
    save_file(state, str(twin / "model.safetensors"))
    quantize_inputs(load_hf_model(str(twin)), dst)
    for tokens, ref in zip(ours, hf_greedy(twin, PROMPTS, MAX_TOKENS)):
        assert_greedy_match(tokens, ref)


def _prompt_token_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return torch.tensor([entry[token].logprob for p, o in zip(prompts, outputs)
                         for entry, token in zip(o.prompt_logprobs[1:], p[1:])])


def test_online_fp8_is_close_to_the_unquantized_model():
    """``quantization="fp8"`` on the fixtures' fp16 base: per-channel absmax/448 weights (the
    rule of llm-compressor's FP8_DYNAMIC, whose fixture holds the same e4m3 codes but where its
    fp16 scales round differently) and per-token activations. This tiny random model has
    logits up to ~40, so any fp8 moves its logprobs a lot: the online model must move them no
    more than the producer's own FP8_DYNAMIC model does (its recorded logits)."""
    reference = load_file(str(FIXTURES / "ct-fp8-dynamic" / "reference_logits.safetensors"))
    keys = [k for k in reference if k.startswith("input_ids_")]
    prompts = [reference[k].long().tolist() for k in keys]
    producer = torch.cat([
        torch.log_softmax(reference[k.replace("input_ids_", "logits_")], -1)[
            torch.arange(len(p) - 1), torch.tensor(p[1:])]
        for k, p in zip(keys, prompts)])
    full = _prompt_token_logprobs(_llm(FIXTURES / "base"), prompts)
    llm = _llm(FIXTURES / "base", quantization="fp8")
    assert llm.engine.model_config.quant_config.method == "fp8"
    layers = _w8a8_layers(llm)
    assert len(layers) == 4 * 2
    codes = load_file(str(FIXTURES / "ct-fp8-dynamic" / "model.safetensors"))
    for layer in layers:
        assert layer.w8a8.qweight.dtype == torch.float8_e4m3fn
        assert layer.w8a8.scale.shape == (sum(layer.output_sizes), 1)  # per channel
        assert "weight" not in layer._parameters
        parent, _, name = layer.prefix.rpartition(".")
        shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]}.get(name, [name])
        theirs = torch.cat([codes[f"{parent}.{s}.weight"] for s in shards]).view(torch.uint8)
        same = (layer.w8a8.qweight.view(torch.uint8) == theirs).float().mean()
        assert same > 0.99, (layer.prefix, float(same))
    online = _prompt_token_logprobs(llm, prompts)
    ours, theirs = (online - full).abs().mean(), (producer - full).abs().mean()
    assert 0 < ours < 1.25 * theirs, (float(ours), float(theirs))


def _ct_fp8(change: dict[str, Any]) -> dict[str, Any]:
    config = json.loads((FIXTURES / "ct-fp8-dynamic" / "config.json").read_text())
    quant = config["quantization_config"]
    group = quant["config_groups"]["group_0"]
    for path, value in change.items():
        target = group
        *parents, leaf = path.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return quant


# (id, quantization_config, error pattern)
BAD_CONFIGS = [
    ("ct-weights-asym", _ct_fp8({"weights.symmetric": False}),
     r"config_groups\.group_0\.weights\.symmetric"),
    ("ct-weights-bits", _ct_fp8({"weights.num_bits": 4}),
     r"config_groups\.group_0\.weights\.num_bits"),
    ("ct-acts-asym", _ct_fp8({"input_activations.symmetric": False}),
     r"config_groups\.group_0\.input_activations\.symmetric"),
    ("ct-acts-none", _ct_fp8({"input_activations": None}),
     r"config_groups\.group_0\.input_activations must be set"),
    ("ct-acts-strategy", _ct_fp8({"input_activations.strategy": "tensor"}),
     r"input_activations\.strategy .*token"),
    ("ct-int-block", _ct_fp8({"format": "int-quantized", "weights.type": "int",
                              "input_activations.type": "int", "weights.strategy": "block"}),
     r"weights\.strategy .*block"),
    ("ct-format-mismatch", _ct_fp8({"format": "int-quantized"}),
     r"quantization_config\.format .*does not fit"),
    ("ct-block-structure", _ct_fp8({"weights.strategy": "block",
                                     "weights.block_structure": [128, 64],
                                     "input_activations.strategy": "group",
                                     "input_activations.group_size": 64}),
     r"weights\.block_structure"),
    ("fp8-activation_scheme", {"quant_method": "fp8", "activation_scheme": "weird"},
     r"quantization_config\.activation_scheme"),
    ("fp8-block-static", {"quant_method": "fp8", "activation_scheme": "static",
                          "weight_block_size": [128, 128]},
     r"quantization_config\.activation_scheme .*weight_block_size"),
    ("fp8-block-size", {"quant_method": "fp8", "activation_scheme": "dynamic",
                        "weight_block_size": [128, 64]},
     r"quantization_config\.weight_block_size"),
]


@pytest.mark.parametrize("case, quant, pattern", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_fail_naming_the_field(case, quant, pattern, tmp_path):
    checkpoint = _checkpoint("ct-fp8-dynamic", tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = quant
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=pattern):
        _llm(checkpoint)


def test_bad_tensors_fail_naming_them(tmp_path):
    checkpoint = _checkpoint("ct-w8a8-int-static", tmp_path)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].float().to(torch.float8_e4m3fn)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match=r"up_proj\.weight'.*dtype torch\.float8_e4m3fn, "
                                         r"expected torch\.int8"):
        _llm(checkpoint)
    tensors = load_file(str(FIXTURES / "ct-w8a8-int-static" / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.input_zero_point"] = torch.zeros(1, dtype=torch.int8)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.input_zero_point' has no place"):
        _llm(checkpoint)


def test_online_fp8_needs_a_full_precision_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"'quantization' is 'fp8' but .* 'compressed-tensors'"):
        _llm(_checkpoint("ct-w8a8-int-static", tmp_path), quantization="fp8")
