"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_new_res,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # Round the sum to the activation dtype before normalizing, as the reference does:
        # the stored residual and the normed value must agree bit for bit.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / hidden
    h = h * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    # Reference: weight * normed.to(x.dtype), so round to x's dtype before the weight multiply.
    normed = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    out = w.to(tl.float32) * normed
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    hidden = x.shape[-1]
    check(weight.shape == (hidden,), f"weight shape {tuple(weight.shape)} != ({hidden},)")
    check(weight.is_contiguous(), "weight must be contiguous")
    x2 = _as_rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    rows = x2.shape[0]
    block = next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    if residual is not None:
        check(residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        r2 = _as_rows(residual)
        new_res = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                              device=x.device)
        nr2 = new_res.view(-1, hidden)
        check(new_res.dtype == x.dtype, "x and residual must have the same dtype")
    else:
        r2 = nr2 = x2  # never read: HAS_RESIDUAL is False
        new_res = None
    if rows > 0:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, nr2,
            x2.stride(0), r2.stride(0), out2.stride(0), nr2.stride(0),
            hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ([..., hidden]); numerics of ``reference.rms_norm``."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass; inputs are not modified."""
    out, new_res = _launch(x, residual, weight, eps)
    assert new_res is not None
    return out, new_res
