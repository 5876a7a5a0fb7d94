"""The host allocator's policy for a CPU engine's activations (glibc malloc)."""

from __future__ import annotations

import ctypes
import os
import sys

# Buffers this large or larger get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 4 << 20
# Free memory at the top of a heap beyond this is returned (glibc's initial value).
TRIM_THRESHOLD_BYTES = 128 << 10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_large_buffers_mapped() -> bool:
    """Fixes glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` and its trim threshold at
    ``TRIM_THRESHOLD_BYTES``; True if they were set.

    glibc starts at 128 KiB but raises the mmap threshold to the size of every mapped block
    that is freed, up to 32 MiB, and the trim threshold to twice that. From then on the
    engine's multi-MiB activations come from the arena heaps, and each step larger than any
    before leaves its high-water resident (measured: tens of MiB at a time, for thousands of
    requests, under a mixed serving load). Fixed thresholds turn that adjustment off: large
    activations are unmapped when freed, and a heap gives back what it frees at its top, while
    the smaller buffers a decode step reuses stay on the heap. The page faults of a fresh
    mapping cost little next to the compute of a step with activations that large. Does
    nothing off Linux, where the C library has no mallopt, or when the user set
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_.
    """
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
