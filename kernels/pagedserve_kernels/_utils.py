"""Small host-side helpers shared by the kernel wrappers."""

from __future__ import annotations

import functools

import torch


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def check(cond: bool, msg: str) -> None:
    """Raise ValueError with ``msg`` unless ``cond``; wrappers validate before launching because
    a bad launch fails far from its cause (or silently reads out of bounds)."""
    if not cond:
        raise ValueError(msg)


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors on a CUDA device (cached: the query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """SM count for CUDA devices; a nominal 132 (an H100) elsewhere, so that the interpreter
    takes the same launch decisions the GPU would."""
    if device.type != "cuda":
        return 132
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())
