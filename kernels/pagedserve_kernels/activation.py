"""SiLU-and-mul: the gated activation of Llama-family MLPs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check, next_power_of_2


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # The reference rounds silu(gate) to x's dtype before the multiply; so do we.
    act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for x [..., 2d]; returns a new [..., d] tensor."""
    check(x.shape[-1] % 2 == 0, f"last dim {x.shape[-1]} must be even")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
        x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block, num_warps=4,
    )
    return out
