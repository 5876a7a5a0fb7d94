"""Compiles every kernel for an H100 (sm_90) ahead of time; run as a script (without
TRITON_INTERPRET) by test_kernels_compile.py. Exit status 0 = all compiled."""

from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedserve_kernels import activation, attention_split, attention_unified, cache, norm, rotary

SM90 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024
INT32_PTRS = {"query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr"}
INT64_PTRS = {"pos_ptr", "slot_ptr"}


def _pointer_type(name: str, dtype: str, cache_dtype: str) -> str:
    if name in ("k_cache_ptr", "v_cache_ptr"):
        return f"*{cache_dtype}"
    if name in INT32_PTRS:
        return "*i32"
    if name in INT64_PTRS:
        return "*i64"
    if name.startswith(("part_", "cache_")):
        return "*fp32"
    return f"*{dtype}"


def compile_sm90(fn, dtype: str, consts: dict, num_stages: int = 3,
                 cache_dtype: str = "") -> int:
    """Compiles ``fn`` for sm_90 (KV-cache pointers of ``cache_dtype``, default ``dtype``);
    returns its shared-memory bytes."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _pointer_type(name, dtype, cache_dtype or dtype)
        else:
            sig[name] = "fp32" if name in ("scale", "eps", "k_scale", "v_scale") else "i32"
        # What the JIT infers at launch for aligned pointers and strides divisible by 16.
        if name.endswith("_ptr") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=SM90, options={"num_warps": 4, "num_stages": num_stages})
    shared = kernel.metadata.shared
    if shared > H100_SHARED_BYTES:
        raise RuntimeError(f"{fn.__name__} {consts}: {shared} bytes of shared memory")
    return shared


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    attn = dict(HEAD_DIM=128, BLOCK_SIZE=16, DOT_PRECISION="tf32")
    compile_sm90(attention_unified.unified_attention_kernel, "bf16",
                 dict(GROUP=4, GROUP_P2=4, BLOCK_M=64, BLOCK_Q=16, TILE_N=64, **attn))
    compile_sm90(attention_unified.unified_attention_kernel, "fp16",
                 dict(GROUP=8, GROUP_P2=8, BLOCK_M=16, BLOCK_Q=2, TILE_N=64, **attn))
    compile_sm90(attention_split.split_kv_decode_kernel, "bf16",
                 dict(GROUP=4, BLOCK_M=16, TILE_N=64, **attn))
    compile_sm90(attention_split.merge_splits_kernel, "bf16", dict(HEAD_DIM=128, SPLITS_P2=32))
    compile_sm90(norm._rms_norm_kernel, "bf16", dict(HAS_RESIDUAL=True, BLOCK=4096))
    compile_sm90(rotary._rotary_kernel, "bf16", dict(HALF=64, QH_P2=32, KH_P2=8))
    compile_sm90(activation._silu_and_mul_kernel, "bf16", dict(BLOCK=1024))
    plain = dict(IS_FP8=False, FP8_MAX=0.0, MANT_BITS=0, MIN_EXP=0)
    compile_sm90(cache._reshape_and_cache_kernel, "bf16",
                 dict(BLOCK_SIZE=16, HEADS_P2=8, HEAD_DIM=128, **plain))
    # FP8 KV caches: the quantizing write and the dequantizing reads.
    for cache_dtype, fmt in (("fp8e4nv", (448.0, 3, -6)), ("fp8e5", (57344.0, 2, -14))):
        fp8 = dict(IS_FP8=True, FP8_MAX=fmt[0], MANT_BITS=fmt[1], MIN_EXP=fmt[2])
        compile_sm90(cache._reshape_and_cache_kernel, "bf16",
                     dict(BLOCK_SIZE=16, HEADS_P2=8, HEAD_DIM=128, **fp8), cache_dtype=cache_dtype)
        compile_sm90(attention_unified.unified_attention_kernel, "bf16",
                     dict(GROUP=4, GROUP_P2=4, BLOCK_M=64, BLOCK_Q=16, TILE_N=64, **attn),
                     cache_dtype=cache_dtype)
        compile_sm90(attention_split.split_kv_decode_kernel, "fp16",
                     dict(GROUP=4, BLOCK_M=16, TILE_N=64, **attn), cache_dtype=cache_dtype)
    print("all kernels compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
