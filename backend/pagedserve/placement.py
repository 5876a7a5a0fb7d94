"""Which CUDA devices one engine's tensor-parallel ranks run on.

The one rule (README "Scaling"): a Triton ``KIND_GPU`` instance that Triton put on GPU ``d``
takes GPUs ``d .. d+tp-1``, so several instances each get their own GPUs when their ids are
``tensor_parallel_size`` apart (``gpus: [0, 2]`` for two tp-2 instances); every other instance
(``KIND_MODEL``, ``KIND_CPU``) and an engine built in-process (``LLM``) take GPUs ``0 .. tp-1``
of the visible ones. Rank ``r`` runs on the ``r``-th device of the list. Pure: no torch here,
the caller counts the devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Triton's instance kinds as the Python backend names them in initialize()'s
# args["model_instance_kind"] (KIND_GPU -> "GPU", ...).
INSTANCE_KINDS = ("GPU", "CPU", "MODEL")


@dataclass(frozen=True)
class InstancePlacement:
    """Where Triton put one model instance: its kind (one of INSTANCE_KINDS) and, for "GPU",
    the GPU it was given (``model_instance_device_id``). The default is an engine nobody
    placed (an in-process ``LLM``): the engine picks its devices itself, as for KIND_MODEL."""

    kind: str = "MODEL"
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INSTANCE_KINDS:
            raise ValueError(f"model_instance_kind must be one of {', '.join(INSTANCE_KINDS)}, "
                             f"got {self.kind!r}")
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or (
                self.device_id < 0):
            raise ValueError(f"model_instance_device_id must be an integer >= 0, "
                             f"got {self.device_id!r}")

    @classmethod
    def from_triton_args(cls, args: Mapping[str, str]) -> InstancePlacement:
        """From the Python backend's initialize() ``args`` (strings: "GPU", "0")."""
        kind = args.get("model_instance_kind", "MODEL")
        raw_id = args.get("model_instance_device_id", "0")
        try:
            device_id = int(raw_id)
        except ValueError:
            raise ValueError(f"model_instance_device_id must be an integer >= 0, "
                             f"got {raw_id!r}") from None
        return cls(kind, device_id)

    @property
    def uses_its_gpu(self) -> bool:
        """Whether Triton chose this instance's GPU (KIND_GPU), so that the engine must run
        there rather than where it likes."""
        return self.kind == "GPU"


# An engine nobody placed: an in-process LLM (or a test's engine).
UNPLACED = InstancePlacement()


def rank_devices(placement: InstancePlacement, tensor_parallel_size: int,
                 num_cuda_devices: int) -> tuple[int, ...]:
    """The CUDA device index of each rank (rank r runs on the r-th), for an engine on CUDA
    that sees ``num_cuda_devices`` devices. More GPUs than exist is a ValueError naming the
    fields that ask for them."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    first = placement.device_id if placement.uses_its_gpu else 0
    if first + tensor_parallel_size > num_cuda_devices:
        if placement.uses_its_gpu:
            asked = (f"a KIND_GPU instance with model_instance_device_id {first} and "
                     f"tensor_parallel_size {tensor_parallel_size} needs GPUs {first}.."
                     f"{first + tensor_parallel_size - 1}")
        else:
            asked = (f"tensor_parallel_size {tensor_parallel_size} needs "
                     f"{tensor_parallel_size} GPUs")
        raise ValueError(f"{asked}, but {_visible(num_cuda_devices)}")
    return tuple(range(first, first + tensor_parallel_size))


def _visible(count: int) -> str:
    if count == 0:
        return "no CUDA device is visible"
    if count == 1:
        return "only 1 CUDA device is visible (index 0)"
    return f"only {count} CUDA devices are visible (indices 0..{count - 1})"
