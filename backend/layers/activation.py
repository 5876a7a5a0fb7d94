"""The gated SiLU of Llama-family MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers import kernel_dispatch


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference: ``silu(x[..., :d]) * x[..., d:]`` for a merged [gate; up] projection."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    """Stateless; dispatches to the Triton kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = kernel_dispatch.ops_for(x)
        return ops.silu_and_mul(x) if ops is not None else silu_and_mul_ref(x)
