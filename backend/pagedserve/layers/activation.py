"""The gated SiLU of Llama-family MLPs."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers import kernel_dispatch
from pagedserve_kernels import reference


class SiluAndMul(nn.Module):
    """Stateless; dispatches to the Triton kernel on CUDA, the C++ one on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (kernel_dispatch.small_ops_for(x) or reference).silu_and_mul(x)
