"""pagedserve's kernels: Triton-language kernels, their pure-torch references, and the CPU's
kernels in C++ (decode attention, fp8 GEMM, the small per-layer ops).

A leaf package: it imports only torch, triton and numpy, never the engine (tests/test_layering.py
holds it to that). The public Triton wrappers are re-exported from ``pagedserve_kernels.ops``
(what the engine's layers and attention backends call on CUDA); ``pagedserve_kernels.reference``
holds the pure-torch version of each, with the same signature: the oracle of the kernel tests
and the engine's CPU path. Importing this package does not import Triton; ``ops`` does.
"""
