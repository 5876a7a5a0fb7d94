"""Builds the C++ CPU kernels under ``cpu/`` with torch's C++ extension machinery (a C++
compiler and ninja are needed), cached under ``~/.cache/torch_extensions``. Where one cannot be
built, ``build`` returns None and logs why once: its caller keeps a pure-torch path.
``PAGEDSERVE_CPU_KERNEL=0`` turns every CPU kernel off."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CPU_SOURCES = pathlib.Path(__file__).with_name("cpu")


def simd_flags(avx512: bool = False) -> list[str]:
    """The compiler's vector flags for this CPU (AVX-512 only where the kernel has a path)."""
    try:
        cpu_flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    if avx512 and {"avx512f", "avx512bw"} <= cpu_flags:
        return ["-mavx512f", "-mavx512bw", "-mfma"]
    return [flag for name, flag in (("avx2", "-mavx2"), ("fma", "-mfma")) if name in cpu_flags]


def build(name: str, source: str, flags: list[str], what: str) -> Optional[ModuleType]:
    """The extension compiled from ``cpu/<source>``, or None (``what`` names it in the log)."""
    if os.environ.get("PAGEDSERVE_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils import cpp_extension

    path = CPU_SOURCES / source
    # The name carries the source, its path, the flags and the torch it builds against: builds
    # for other CPUs, environments or checkouts never collide (the build folder's ninja file
    # names the source's path, so two checkouts sharing one rebuilt it on every load).
    key = str(path) + path.read_text() + " ".join(flags) + torch.__file__ + torch.__version__
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    try:
        return cpp_extension.load(
            name=f"{name}_{digest}",
            sources=[str(path)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: keep the torch path
        logger.warning("pagedserve: %s unavailable (%s); using pure torch", what, e)
        return None
