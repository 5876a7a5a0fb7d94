"""RMSNorm, with the residual add fused in, as Llama-family models use it."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pagedserve.layers import kernel_dispatch
from pagedserve_kernels import reference


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
        ops = kernel_dispatch.small_ops_for(x) or reference
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
