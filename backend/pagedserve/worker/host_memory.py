"""The host allocator's policy for a CPU engine's activations (glibc malloc)."""

from __future__ import annotations

import ctypes
import os
import sys

# Buffers this large or larger get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def keep_large_buffers_mapped() -> bool:
    """Fixes glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES``; True if it was set.

    glibc starts at 128 KiB but raises the threshold to the size of every mapped block that is
    freed, up to 32 MiB; from then on the engine's multi-MiB activations come from the arena
    heaps, and each step larger than any before leaves its high-water resident (measured: tens
    of MiB at a time, for thousands of requests, under a mixed serving load). A fixed threshold
    turns that adjustment off, so large activations are unmapped when freed; smaller ones,
    which a decode step reuses, stay on the heap. The page faults of a fresh mapping cost little
    next to the compute of a step with activations that large. Does nothing off Linux, where
    the C library has no mallopt, or when MALLOC_MMAP_THRESHOLD_ is set (the user's choice).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
