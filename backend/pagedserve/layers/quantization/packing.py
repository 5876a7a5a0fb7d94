"""Bit packing of quantized integers into int32 words, in the orders checkpoints use.

Every format packs ``32 // bits`` unsigned values per int32 word, value ``i`` of a word at bit
``bits * i`` (little end first). They differ in the dimension they pack along and, for AWQ, in
the order of the values inside a word.
"""

from __future__ import annotations

import torch

# AWQ GEMM packs column 8c + AWQ_ORDER[i] at shift 4i, so column 8c + j sits at shift
# 4 * AWQ_REVERSE[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def values_per_word(bits: int) -> int:
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [R/pf, C] packed along dim 0 -> int32 [rows, C] of unsigned values."""
    pf = values_per_word(bits)
    shifts = _shifts(bits, packed.device).view(1, pf, 1)
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[-1])[:rows]


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [R, C/pf] packed along dim 1 -> int32 [R, cols] of unsigned values."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R, C] of unsigned values < 2**bits -> int32 [ceil(R/pf), C] packed along dim 0
    (rows past R are zero)."""
    pf = values_per_word(bits)
    rows = values.shape[0]
    padded = -(-rows // pf) * pf
    v = torch.zeros(padded, values.shape[1], dtype=torch.int64, device=values.device)
    v[:rows] = values.to(torch.int64) & ((1 << bits) - 1)
    shifts = _shifts(bits, values.device).to(torch.int64).view(1, pf, 1)
    words = (v.view(-1, pf, values.shape[1]) << shifts).sum(dim=1)
    # Words are unsigned 32-bit patterns; int32 storage wraps the top bit, as checkpoints do.
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R, C] -> int32 [R, ceil(C/pf)] packed along dim 1."""
    return pack_rows(values.t(), bits).t().contiguous()


def awq_unpack_cols(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """AWQ's int32 [R, C/8] (4-bit, interleaved order) -> int32 [R, cols] in column order."""
    values = unpack_cols(packed, 4, packed.shape[1] * 8)
    order = torch.tensor(AWQ_REVERSE, device=packed.device)
    index = (torch.arange(packed.shape[1] * 8, device=packed.device) // 8) * 8 + order.repeat(
        packed.shape[1]
    )
    return values[:, index][:, :cols]


def awq_pack_cols(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] (C a multiple of 8) -> AWQ's int32 [R, C/8]."""
    order = torch.tensor(AWQ_ORDER, device=values.device)
    index = (torch.arange(values.shape[1], device=values.device) // 8) * 8 + order.repeat(
        values.shape[1] // 8
    )
    return pack_cols(values[:, index], 4)
