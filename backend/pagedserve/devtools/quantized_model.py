"""Quantized checkpoints of the locally built models, for tests and benchmarks: writes a
checkpoint exactly as each producer packs it (GPTQ v1/v2, AWQ GEMM, compressed-tensors
pack-quantized; see docs/design.md), and a full-precision twin holding the dequantized weights,
which HF transformers runs as the parity reference.

Quantization is plain round-to-nearest min/max per group; what matters is that the packed
tensors decode to the twin's weights bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from pagedserve.layers.quantization.packing import awq_pack_cols, pack_cols, pack_rows

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Quantized:
    """One weight W [N, K] quantized: unsigned q [N, K], scales/zeros [G, N], g_idx [K]."""

    q: torch.Tensor
    scales: torch.Tensor  # fp16, as checkpoints store them
    zeros: torch.Tensor  # int
    g_idx: torch.Tensor
    dequantized: torch.Tensor  # [N, K] fp32


def quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, order: Optional[torch.Tensor] = None
) -> Quantized:
    """Round-to-nearest per group; ``order`` (a permutation of K) is GPTQ's act order: the
    columns order[j] for j in one run of group_size share a group."""
    n, k = w.shape
    group = k if group_size == -1 else group_size
    position = torch.arange(k) if order is None else torch.argsort(order)
    g_idx = (position // group).to(torch.int32)
    groups = k // group
    maxq = (1 << bits) - 1
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            s = cols.abs().amax(dim=1).clamp(min=1e-8) / ((maxq + 1) / 2 - 0.5)
            z = torch.full((n,), (maxq + 1) // 2)
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            z = torch.round(-lo / s).clamp(0, maxq).to(torch.int64)
        scales[g], zeros[g] = s, z
    scales = scales.half()
    s_full = scales.float()[g_idx.long()].t()  # [N, K]
    z_full = zeros[g_idx.long()].t()
    q = torch.round(w / s_full + z_full).clamp(0, maxq).to(torch.int64)
    return Quantized(q, scales, zeros, g_idx, (q - z_full).float() * s_full)


def _tensors_of(fmt: str, qz: Quantized, bits: int, with_g_idx: bool) -> dict[str, torch.Tensor]:
    if fmt in ("gptq", "gptq_v2"):
        stored = qz.zeros - 1 if fmt == "gptq" else qz.zeros
        out = {
            "qweight": pack_rows(qz.q.t(), bits),
            "qzeros": pack_cols(stored & ((1 << bits) - 1), bits),
            "scales": qz.scales,
        }
        if with_g_idx:
            out["g_idx"] = qz.g_idx
        return out
    if fmt == "awq":
        return {"qweight": awq_pack_cols(qz.q.t()), "qzeros": awq_pack_cols(qz.zeros),
                "scales": qz.scales}
    if fmt == "pack_quantized":
        out = {
            "weight_packed": pack_cols(qz.q, bits),
            "weight_scale": qz.scales.t().contiguous(),
            "weight_shape": torch.tensor(list(qz.q.shape), dtype=torch.int64),
        }
        if not bool((qz.zeros == 1 << (bits - 1)).all()):
            out["weight_zero_point"] = pack_rows(qz.zeros.t(), bits)
        return out
    if fmt == "int_quantized":  # compressed-tensors W8A8: signed int8 [N, K], scale [N, G]
        if bits != 8 or not bool((qz.zeros == 128).all()):
            raise ValueError("int_quantized checkpoints are 8-bit symmetric")
        return {"weight": (qz.q - 128).to(torch.int8), "weight_scale": qz.scales.t().contiguous()}
    raise ValueError(fmt)


def write_quantized(
    src: Path,
    dst: Path,
    twin: Path,
    fmt: str,
    quantization_config: dict[str, Any],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    with_g_idx: bool = True,
    skip: tuple[str, ...] = (),
    overrides: Optional[dict[str, dict[str, Any]]] = None,
    config_file: Optional[str] = None,
    quantize_lm_head: bool = False,
) -> None:
    """Writes ``dst`` (the quantized checkpoint) and ``twin`` (dequantized, unquantized config)
    from the tiny checkpoint ``src``. Modules whose name contains an entry of ``skip`` stay
    full precision; ``overrides`` maps a module name to its own bits/group_size/sym. q/k/v and
    gate/up share an act order (they see the same inputs). ``config_file`` writes the config to
    a legacy file instead of config.json. ``quantize_lm_head`` quantizes the LM head too (GPTQ's
    ``lm_head: true``); a tied checkpoint then gets its head stored apart, as producers do, and
    the twin is untied."""
    for path in (dst, twin):
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(src, path)
    weights = load_file(str(src / "model.safetensors"))
    untie_twin = quantize_lm_head and "lm_head.weight" not in weights
    if untie_twin:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        module = name.rsplit(".", 1)[0]
        leaf = module.rsplit(".", 1)[-1]
        linear = leaf in LINEAR_NAMES or (quantize_lm_head and module == "lm_head")
        if not linear or not name.endswith(".weight") or any(s in module for s in skip):
            quantized[name] = tensor
            dequantized[name] = tensor
            continue
        opts = {"bits": bits, "group_size": group_size, "sym": sym, **(overrides or {}).get(
            module, {})}
        order = None
        if act_order:
            fused = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                     "up_proj": "gate_up"}
            key = module.rsplit(".", 1)[0] + "." + fused.get(leaf, leaf)
            if key not in orders:
                orders[key] = torch.randperm(tensor.shape[1], generator=gen)
            order = orders[key]
        qz = quantize(tensor.float(), opts["bits"], opts["group_size"], opts["sym"], order)
        for suffix, t in _tensors_of(fmt, qz, opts["bits"], with_g_idx or act_order).items():
            quantized[f"{module}.{suffix}"] = t
        dequantized[name] = qz.dequantized.to(tensor.dtype)
    save_file(quantized, str(dst / "model.safetensors"))
    save_file(dequantized, str(twin / "model.safetensors"))
    if untie_twin:
        twin_config = json.loads((twin / "config.json").read_text())
        twin_config["tie_word_embeddings"] = False
        (twin / "config.json").write_text(json.dumps(twin_config, indent=2))
    config = json.loads((dst / "config.json").read_text())
    if config_file is None:
        config["quantization_config"] = quantization_config
    else:
        (dst / config_file).write_text(json.dumps(quantization_config))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
