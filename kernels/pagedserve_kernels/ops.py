"""The public kernel entry points, as the layers and attention backends call them.

Importing this module imports Triton (and decorates the kernels: on a machine without a GPU,
``TRITON_INTERPRET=1`` must be set before that for the kernels to run in the interpreter).
"""

from __future__ import annotations

from pagedserve_kernels.activation import silu_and_mul
from pagedserve_kernels.attention import AttentionConfig, unified_attention
from pagedserve_kernels.cache import reshape_and_cache
from pagedserve_kernels.int_gemm import int_weight_matmul
from pagedserve_kernels.norm import fused_add_rms_norm, rms_norm
from pagedserve_kernels.rotary import rotary_embedding
from pagedserve_kernels.scaled_gemm import scaled_matmul

__all__ = [
    "AttentionConfig",
    "fused_add_rms_norm",
    "int_weight_matmul",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "scaled_matmul",
    "silu_and_mul",
    "unified_attention",
]
