"""RMSNorm, with the residual add fused in, as Llama-family models use it."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pagedserve.layers import kernel_dispatch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Reference: ``residual = x + residual`` (if given), then RMSNorm in fp32 like HF.

    Returns the normed tensor, or (normed, new residual) when a residual is given.
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


class RMSNorm(nn.Module):
    """Owns the norm weight; ``forward(x, residual)`` returns (normed, new residual)."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        ops = kernel_dispatch.ops_for(x)
        if ops is not None:
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps, residual)
