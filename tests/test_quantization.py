"""Quantized checkpoints: each int weight-only format, written by the test's own packer
(tests/quant_packers.py), loads and decodes greedily in fp32 on the CPU exactly as HF
transformers does on the dequantized weights; fixtures from the real producers
(tests/fixtures/quant/<name>/) the same, when present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hf_reference import assert_greedy_match, hf_greedy, load_hf_model

from pagedserve import LLM, SamplingParams
from pagedserve.devtools.quantized_model import write_quantized

MAX_TOKENS = 16
PROMPTS = [[5, 17, 33, 9, 100, 7], [300, 2, 41], list(range(40, 71))]
FIXTURES = Path(__file__).parent / "fixtures" / "quant"


def gptq_config(bits: int, group: int, sym: bool, desc_act: bool, fmt: str = "gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
            "desc_act": desc_act, "checkpoint_format": fmt, "lm_head": False}


def ct_config(bits: int, group: int, sym: bool) -> dict[str, Any]:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "group" if group > 0 else "channel",
               "group_size": group if group > 0 else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None}},
            "ignore": ["lm_head"]}


def awq_config(group: int) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


def auto_round_config(packing: str, sym: bool, extra: dict | None = None) -> dict[str, Any]:
    return {"quant_method": "auto-round", "packing_format": packing, "bits": 4,
            "group_size": 32, "sym": sym, "data_type": "int", "autoround_version": "0.16.1",
            "extra_config": extra or {}}


MID = "model.layers.1.mlp.down_proj"
# GPTQModel's per-module rules, first match wins: layer 0's down_proj is left unquantized (so
# the last rule does not reach it), layer 1's gate/up (one fused layer) are 8-bit, every other
# down_proj is g64; the rest keep the base 4-bit g32.
DYNAMIC = {r"-:model\.layers\.0\.mlp\.down_proj": {},
           r"model\.layers\.1\.mlp\.(gate|up)_proj": {"bits": 8},
           r"+:.*down_proj": {"group_size": 64}}
DYNAMIC_WRITTEN = {"model.layers.1.mlp.gate_proj": {"bits": 8},
                   "model.layers.1.mlp.up_proj": {"bits": 8}, MID: {"group_size": 64}}
# id -> (packer format, quantization_config, packer options)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "gptq-4bit-g32-sym": ("gptq", gptq_config(4, 32, True, False),
                          dict(bits=4, group_size=32, sym=True)),
    "gptq-4bit-g64-asym-desc_act": ("gptq", gptq_config(4, 64, False, True),
                                    dict(bits=4, group_size=64, sym=False, act_order=True)),
    "gptq-8bit-channel-sym": ("gptq", gptq_config(8, -1, True, False),
                              dict(bits=8, group_size=-1, sym=True)),
    "gptq-8bit-g32-asym-desc_act": ("gptq", gptq_config(8, 32, False, True),
                                    dict(bits=8, group_size=32, sym=False, act_order=True)),
    "gptq_v2-4bit-g32-asym": ("gptq_v2", gptq_config(4, 32, False, False, "gptq_v2"),
                              dict(bits=4, group_size=32, sym=False)),
    # A v2 checkpoint labelled v1 (its symmetric zeros are 8, not 7): read as v2.
    "gptq-mislabelled-v2": ("gptq_v2", gptq_config(4, 32, True, False, "gptq"),
                            dict(bits=4, group_size=32, sym=True)),
    "gptq-dynamic": ("gptq", {**gptq_config(4, 32, True, False), "dynamic": DYNAMIC},
                     dict(bits=4, group_size=32, sym=True, skip=("layers.0.mlp.down_proj",),
                          overrides=DYNAMIC_WRITTEN)),
    "gptq-4bit-g32-asym-desc_act-lm_head": (
        "gptq", {**gptq_config(4, 32, False, True), "lm_head": True},
        dict(bits=4, group_size=32, sym=False, act_order=True, quantize_lm_head=True)),
    # dynamic reaches the head too (GPTQModel names it lm_head).
    "gptq_v2-lm_head-dynamic-8bit": (
        "gptq_v2", {**gptq_config(4, 32, True, False, "gptq_v2"), "lm_head": True,
                    "dynamic": {r"+:lm_head": {"bits": 8, "group_size": -1}}},
        dict(bits=4, group_size=32, sym=True, quantize_lm_head=True,
             overrides={"lm_head": {"bits": 8, "group_size": -1}})),
    "awq-4bit-g32": ("awq", awq_config(32), dict(bits=4, group_size=32, sym=False)),
    "awq-4bit-g64-not-converted": (
        "awq", {**awq_config(64), "modules_to_not_convert": ["down_proj"]},
        dict(bits=4, group_size=64, sym=False, skip=("down_proj",))),
    "auto_round-gptq-extra_config": (
        "gptq", auto_round_config("auto_round:auto_gptq", True,
                                  {MID: {"bits": 8}, "model.layers.0.mlp.down_proj": {"bits": 16}}),
        dict(bits=4, group_size=32, sym=True, with_g_idx=False, skip=("layers.0.mlp.down_proj",),
             overrides={MID: {"bits": 8}})),
    "auto_round-gptq-lm_head": (
        "gptq", auto_round_config("auto_round:auto_gptq", True, {"lm_head": {"bits": 8}}),
        dict(bits=4, group_size=32, sym=True, with_g_idx=False, quantize_lm_head=True,
             overrides={"lm_head": {"bits": 8}})),
    "auto_round-awq": ("awq", auto_round_config("auto_round:auto_awq", False),
                       dict(bits=4, group_size=32, sym=False)),
    "intel-auto-round-legacy": (
        "gptq", {**auto_round_config("auto_round:gptq", True), "quant_method": "intel/auto-round"},
        dict(bits=4, group_size=32, sym=True, with_g_idx=False)),
    "ct-w4a16-g32-sym": ("pack_quantized", ct_config(4, 32, True),
                         dict(bits=4, group_size=32, sym=True)),
    "ct-w4a16-g64-asym": ("pack_quantized", ct_config(4, 64, False),
                          dict(bits=4, group_size=64, sym=False)),
    "ct-w8a16-channel-sym": ("pack_quantized", ct_config(8, -1, True),
                             dict(bits=8, group_size=-1, sym=True)),
    "ct-w8a16-g32-asym": ("pack_quantized", ct_config(8, 32, False),
                          dict(bits=8, group_size=32, sym=False)),
}


def _greedy(path: Path, **kwargs: Any):
    llm = LLM(str(path), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=16 << 20,
              **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("case", list(CASES))
def test_format_matches_hf_on_dequantized_weights(case, base_model, tmp_path):
    fmt, config, options = CASES[case]
    dst, twin = tmp_path / "quantized", tmp_path / "twin"
    write_quantized(base_model, dst, twin, fmt, config, **options)
    ours, llm = _greedy(dst)
    assert llm.engine.model_config.quant_config is not None
    for tokens, ref in zip(ours, hf_greedy(twin, PROMPTS, MAX_TOKENS)):
        assert_greedy_match(tokens, ref)


def _twin_weights(twin: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(twin / "model.safetensors"))


@pytest.mark.parametrize("case", ["gptq-4bit-g64-asym-desc_act", "gptq-8bit-g32-asym-desc_act",
                                  "awq-4bit-g32", "ct-w4a16-g64-asym", "ct-w8a16-channel-sym"])
def test_layers_hold_the_dequantized_weights(case, base_model, tmp_path):
    """Layer by layer: the internal layout decodes to the twin's weights exactly, and the CPU
    kernel multiplies by them (fp32 activations: to rounding; bf16: to bf16's precision)."""
    import torch

    from pagedserve.layers.linear import LinearBase

    fmt, config, options = CASES[case]
    dst, twin = tmp_path / "quantized", tmp_path / "twin"
    write_quantized(base_model, dst, twin, fmt, config, **options)
    _, llm = _greedy(dst)
    reference = _twin_weights(twin)
    checked = 0
    for module in llm.engine.runner.model.modules():
        if not isinstance(module, LinearBase):
            continue
        parent, _, name = module.prefix.rpartition(".")
        shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]}.get(name, [name])
        dense = torch.cat([reference[f"{parent}.{s}.weight"] for s in shards]).float()
        assert module.int_weight is None  # the CPU kernel's copy is the only one
        kernel = module.cpu_kernel
        torch.testing.assert_close(kernel.dense(), dense, rtol=1e-6, atol=1e-6)
        x = torch.randn(5, kernel.in_features)
        torch.testing.assert_close(kernel.matmul(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == 4 * 2


@pytest.mark.parametrize("case", ["gptq-4bit-g64-asym-desc_act", "ct-w8a16-g32-asym"])
def test_the_layout_decodes_exactly_and_bf16_is_close(case, base_model, tmp_path):
    """The internal layout decodes bit for bit to the twin's weights, and the CPU kernels in
    bf16 (the fast path) stay within bf16's precision of the exact product."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from pagedserve.layers.linear import LinearBase
    from pagedserve.layers.quantization import parse_quantization
    from pagedserve.layers.quantization.int_layout import (
        CpuIntKernel,
        dequantize,
        make_int_weight,
    )

    fmt, config, options = CASES[case]
    dst, twin = tmp_path / "quantized", tmp_path / "twin"
    write_quantized(base_model, dst, twin, fmt, config, **options)
    tensors, reference = load_file(str(dst / "model.safetensors")), _twin_weights(twin)
    prefix = "model.layers.1.mlp.down_proj"
    dense = reference[f"{prefix}.weight"].float()
    method = parse_quantization(dst, {"quantization_config": config}).method_for(prefix)
    layer = LinearBase(dense.shape[1], [dense.shape[0]], linear_method=method, prefix=prefix)
    for name, param in layer.named_parameters():
        if f"{prefix}.{name}" in tensors:
            param.weight_loader(param, tensors[f"{prefix}.{name}"], None)
    q, scales, zeros, g_idx = method.checkpoint_values(layer)
    weight = make_int_weight(q, scales, zeros, g_idx, method.scheme.bits,
                             layer.int_shapes[2], torch.float32, prefix)
    in_layout = dense if weight.perm is None else dense[:, weight.perm]
    assert torch.equal(dequantize(weight), in_layout)
    bf16 = CpuIntKernel(dataclasses.replace(weight, scales=weight.scales.bfloat16()))
    x = torch.randn(7, dense.shape[1])
    exact = x @ dense.t()
    rel = (bf16.matmul(x.bfloat16()).float() - exact).abs().mean() / exact.abs().mean()
    assert rel < 0.02, float(rel)


# ---- bad configs and checkpoints -----------------------------------------------------------

# (id, quantization_config (or a change to a valid GPTQ one), engine kwargs, error pattern)
BAD_CONFIGS = [
    ("bits", {"bits": 3}, {}, r"quantization_config\.bits .*3"),
    ("group_size", {"group_size": 16}, {}, r"quantization_config\.group_size"),
    ("lm_head", {"lm_head": True}, {},
     r"'lm_head\.weight' has no place .*quantizes the LM head"),
    ("lm_head-type", {"lm_head": "yes"}, {}, r"quantization_config\.lm_head"),
    ("checkpoint_format", {"checkpoint_format": "marlin"}, {},
     r"quantization_config\.checkpoint_format"),
    ("dynamic-regex", {"dynamic": {"+:model.(layers": {}}}, {},
     r"quantization_config\.dynamic\['\+:model\.\(layers'\] is not a valid regex"),
    ("dynamic-override", {"dynamic": {".*down": {"damp_percent": 0.1}}}, {},
     r"quantization_config\.dynamic\['\.\*down'\] overrides damp_percent"),
    ("dynamic-bits", {"dynamic": {".*down": {"bits": 3}}}, {},
     r"quantization_config\.dynamic\['\.\*down'\]\.bits .*3"),
    ("dynamic-type", {"dynamic": [".*down"]}, {}, r"quantization_config\.dynamic must be"),
    ("quant_method", {"quant_method": "bitsandbytes"}, {}, r"quant_method 'bitsandbytes'"),
    ("awq-version", {"quant_method": "awq", "version": "gemv"}, {},
     r"quantization_config\.version"),
    ("awq-zero_point", {"quant_method": "awq", "zero_point": False}, {},
     r"quantization_config\.zero_point"),
    ("auto-round-packing", {"quant_method": "auto-round", "packing_format": "auto_round:x"}, {},
     r"quantization_config\.packing_format"),
    ("auto-round-extra", {"quant_method": "auto-round",
                          "extra_config": {"model.layers.0.mlp.up_proj": {"bits": 2}}}, {},
     r"quantization_config\.bits .*2"),
    ("ct-format", {**ct_config(4, 32, True), "format": "float-quantized"}, {},
     r"quantization_config\.format"),
    ("ct-activations", {**ct_config(4, 32, True), "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": ct_config(4, 32, True)["config_groups"]["group_0"][
            "weights"], "input_activations": {"num_bits": 8}}}}, {},
     r"config_groups\.group_0\.input_activations"),
    ("argument-mismatch", {}, {"quantization": "awq"},
     r"'quantization' is 'awq' but .* quantized with 'gptq'"),
    ("argument-unknown", {}, {"quantization": "squeezellm"},
     r"'quantization' 'squeezellm' is not supported"),
]


@pytest.mark.parametrize("case, change, kwargs, pattern", BAD_CONFIGS,
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_fail_naming_the_field(case, change, kwargs, pattern, base_model, tmp_path):
    config = {**gptq_config(4, 32, True, False), **change}
    write_quantized(base_model, tmp_path / "q", tmp_path / "twin", "gptq", config,
                    bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match=pattern):
        _greedy(tmp_path / "q", **kwargs)


def test_quantization_argument_on_an_unquantized_checkpoint(base_model):
    with pytest.raises(ValueError, match=r"'quantization' is 'gptq' but .* is not quantized"):
        _greedy(base_model, quantization="gptq")


def test_quantization_argument_names_and_legacy_files(base_model, tmp_path):
    # quantize_config.json (GPTQ's legacy file) instead of config.json; gptq_marlin is gptq.
    write_quantized(base_model, tmp_path / "q", tmp_path / "twin", "gptq",
                    {k: v for k, v in gptq_config(4, 32, True, False).items()
                     if k != "quant_method"},
                    bits=4, group_size=32, sym=True, config_file="quantize_config.json")
    ours, llm = _greedy(tmp_path / "q", quantization="gptq_marlin")
    assert llm.engine.model_config.quant_config.method == "gptq"
    # AWQ's legacy quant_config.json with its own key names.
    write_quantized(base_model, tmp_path / "a", tmp_path / "twin_a", "awq",
                    {"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"},
                    bits=4, group_size=32, sym=False, config_file="quant_config.json")
    _, llm = _greedy(tmp_path / "a")
    assert llm.engine.model_config.quant_config.method == "awq"


def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_bad_checkpoint_tensors_fail_naming_them(base_model, tmp_path):
    import torch

    def load(change, config=None, **options):
        options = {"bits": 4, "group_size": 32, "sym": True, **options}
        write_quantized(base_model, tmp_path / "q", tmp_path / "twin", "gptq",
                        config or gptq_config(4, 32, options["sym"], False), **options)
        _rewrite(tmp_path / "q", change)
        _greedy(tmp_path / "q")

    def extra(t):
        t["model.layers.0.mlp.down_proj.bogus"] = torch.zeros(3)

    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.bogus' has no "):
        load(extra)

    def wrong_shape(t):
        t["model.layers.0.self_attn.k_proj.scales"] = torch.zeros(3, 32, dtype=torch.float16)

    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.scales'.*shape"):
        load(wrong_shape)

    def uneven_zeros(t):
        t["model.layers.1.mlp.up_proj.qzeros"][0, 0] = 0x12345678

    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_up_proj: sym is true"):
        load(uneven_zeros)

    def other_act_order(t):
        t["model.layers.0.self_attn.v_proj.g_idx"] = t[
            "model.layers.0.self_attn.v_proj.g_idx"].flip(0)

    with pytest.raises(ValueError, match=r"v_proj\.g_idx'.*differs between the shards"):
        load(other_act_order, gptq_config(4, 32, False, True), sym=False, act_order=True)


def test_fused_shards_quantized_differently_fail(base_model, tmp_path):
    config = auto_round_config("auto_round:auto_gptq", True,
                               {"model.layers.0.self_attn.k_proj": {"bits": 8}})
    write_quantized(base_model, tmp_path / "q", tmp_path / "twin", "gptq", config, bits=4,
                    group_size=32, sym=True, with_g_idx=False,
                    overrides={"model.layers.0.self_attn.k_proj": {"bits": 8}})
    with pytest.raises(ValueError, match=r"self_attn\.qkv_proj: its shards .* differently"):
        _greedy(tmp_path / "q")
    # The same through GPTQModel's dynamic, and a shard left out by a -: rule.
    for rule, override in (({"+:.*layers\\.1\\..*k_proj": {"bits": 8}}, {"bits": 8}),
                           ({"-:.*layers\\.1\\..*k_proj": {}}, None)):
        config = {**gptq_config(4, 32, True, False), "dynamic": rule}
        write_quantized(base_model, tmp_path / "q", tmp_path / "twin", "gptq", config, bits=4,
                        group_size=32, sym=True,
                        overrides={"model.layers.1.self_attn.k_proj": override or {}},
                        skip=() if override else ("layers.1.self_attn.k_proj",))
        with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj: its shards"):
            _greedy(tmp_path / "q")


def test_quantized_lm_head_of_a_tied_checkpoint(tiny_model_dir, tmp_path):
    """A tied checkpoint whose head the producer quantized stores the head apart: the engine
    unties it (HF runs the untied twin); with no head tensors the load names tie_word_embeddings."""
    tied = tiny_model_dir("llama", tie_word_embeddings=True)
    config = {**gptq_config(4, 32, True, False), "lm_head": True}
    dst, twin = tmp_path / "quantized", tmp_path / "twin"
    write_quantized(tied, dst, twin, "gptq", config, bits=4, group_size=32, sym=True,
                    quantize_lm_head=True)
    ours, llm = _greedy(dst)
    model = llm.engine.runner.model
    assert model.lm_head.prefix == "lm_head" and model.lm_head.cpu_kernel is not None
    for tokens, ref in zip(ours, hf_greedy(twin, PROMPTS, MAX_TOKENS)):
        assert_greedy_match(tokens, ref)
    write_quantized(tied, dst, twin, "gptq", config, bits=4, group_size=32, sym=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings is true .* no lm_head tensors"):
        _greedy(dst)


def _fixture_dirs() -> list[Path]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())


@pytest.mark.skipif(not _fixture_dirs(), reason=f"no producer fixtures under {FIXTURES} yet")
@pytest.mark.parametrize("fixture", _fixture_dirs(), ids=lambda p: p.name)
def test_producer_fixture_matches_hf_on_dequantized_weights(fixture, tmp_path, monkeypatch):
    """A real producer's checkpoint: greedy output equals HF transformers on the weights our
    loader decoded (written back as a full-precision twin); where the format quantizes
    activations too (W8A8, FP8), HF's linear inputs are quantized by the format's rule, stated
    independently (``activation_quantizer``)."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    from pagedserve.layers.linear import LinearBase

    monkeypatch.setenv("PAGEDSERVE_ONEDNN", "0")  # keep unquantized layers' dense weights
    # The checkpoint alone, as a user would have it: the fixture also holds the producer's
    # logits (reference_logits.safetensors), and the fixtures share one tokenizer, in base/.
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(fixture, checkpoint, ignore=shutil.ignore_patterns("reference_logits*"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "base" / name, checkpoint / name)
    ours, llm = _greedy(checkpoint)
    if llm.engine.model_config.quant_config is None:
        pytest.skip(f"{fixture.name} is not quantized")
    twin = tmp_path / "twin"
    shutil.copytree(checkpoint, twin, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors: dict[str, torch.Tensor] = {}
    for name, param in llm.engine.runner.model.named_parameters():
        tensors[name] = param.detach().float().contiguous()
    for module in llm.engine.runner.model.modules():
        if isinstance(module, LinearBase):
            kernel = getattr(module, "cpu_kernel", None) or getattr(module, "w8a8", None)
            if kernel is not None:
                tensors[f"{module.prefix}.weight"] = kernel.dense()
    state = {}
    for name, t in tensors.items():
        parent, _, leaf = name.rpartition(".")
        module_parent, _, module = parent.rpartition(".")
        split = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                 "gate_up_proj": ["gate_proj", "up_proj"]}.get(module)
        if split and leaf in ("weight", "bias"):
            sizes = [m.output_sizes for m in llm.engine.runner.model.modules()
                     if isinstance(m, LinearBase) and m.prefix == parent][0]
            for shard, part in zip(split, t.split(sizes)):
                state[f"{module_parent}.{shard}.{leaf}"] = part.contiguous()
        else:
            state[name] = t
    save_file(state, str(twin / "model.safetensors"))
    config = json.loads((twin / "config.json").read_text())
    config.pop("quantization_config", None)
    (twin / "config.json").write_text(json.dumps(config))
    quantize_inputs(load_hf_model(str(twin)), checkpoint)
    for tokens, ref in zip(ours, hf_greedy(twin, PROMPTS, MAX_TOKENS)):
        assert_greedy_match(tokens, ref)


def activation_quantizer(checkpoint: Path, prefix: str):
    """The input quantize-dequantize of layer ``prefix`` that the checkpoint's format means, or
    None: compressed-tensors' rule is test_quant_fixtures' (checked there against the
    producer's logits); native FP8 quantizes statically by ``input_scale``, else dynamically
    per token, or per token and group of 128 with block weights."""
    import json

    import torch
    from safetensors.torch import load_file
    from test_quant_fixtures import activation_quantizer as compressed_tensors_rule

    q = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    if q["quant_method"] != "fp8":
        return compressed_tensors_rule(q, tensors, prefix)
    top = torch.finfo(torch.float8_e4m3fn).max

    def rounded(x):
        return x.clamp(-top, top).to(torch.float8_e4m3fn).float()

    if q["activation_scheme"] == "static":
        scale = tensors[f"{prefix}.input_scale"].float()
        return lambda x: rounded(x / scale) * scale
    group = (q.get("weight_block_size") or [None, None])[1]

    def dynamic(x):
        grouped = x.reshape(*x.shape[:-1], -1, group or x.shape[-1])
        scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
        return (rounded(grouped / scale) * scale).reshape(x.shape)

    return dynamic


def quantize_inputs(model, checkpoint: Path) -> None:
    """Hooks the format's activation quantization onto an HF model's decoder linears."""
    import torch

    for name, module in model.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            quantize = activation_quantizer(checkpoint, name)
            if quantize is not None:
                module.register_forward_pre_hook(lambda _m, args, f=quantize: (f(args[0]),))
