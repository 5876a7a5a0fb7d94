"""Which CUDA devices one engine's tensor-parallel ranks run on.

The one rule (README "Scaling"): a Triton ``KIND_GPU`` instance that Triton put on GPU ``d``
takes GPUs ``d .. d+tp-1``, so several instances each get their own GPUs when their ids are
``tensor_parallel_size`` apart (``gpus: [0, 2]`` for two tp-2 instances); every other instance
(``KIND_MODEL``, ``KIND_CPU``) and an engine built in-process (``LLM``) take GPUs ``0 .. tp-1``
of the visible ones, or the ``GPU_DEVICE_IDS`` its config.pbtxt lists (vllm_backend's
parameter for KIND_MODEL). Rank ``r`` runs on the ``r``-th device of the list. Pure: no torch
here, the caller counts the devices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

# Triton's instance kinds as the Python backend names them in initialize()'s
# args["model_instance_kind"] (KIND_GPU -> "GPU", ...).
INSTANCE_KINDS = ("GPU", "CPU", "MODEL")
GPU_DEVICE_IDS = "GPU_DEVICE_IDS"  # the config.pbtxt parameter (vllm_backend's name)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class InstancePlacement:
    """Where Triton put one model instance: its kind (one of INSTANCE_KINDS), for "GPU" the
    GPU it was given (``model_instance_device_id``), and for the others the GPUs its
    config.pbtxt's GPU_DEVICE_IDS lists (empty: GPUs 0..tp-1). The default is an engine
    nobody placed (an in-process ``LLM``), which picks its devices as KIND_MODEL does."""

    kind: str = "MODEL"
    device_id: int = 0
    gpu_device_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in INSTANCE_KINDS:
            raise ValueError(f"model_instance_kind must be one of {', '.join(INSTANCE_KINDS)}, "
                             f"got {self.kind!r}")
        if not _is_index(self.device_id):
            raise ValueError(f"model_instance_device_id must be an integer >= 0, "
                             f"got {self.device_id!r}")
        ids = self.gpu_device_ids
        if not all(_is_index(i) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{GPU_DEVICE_IDS} must list distinct GPU indices >= 0, "
                             f"got {list(ids)!r}")
        if ids and self.kind == "GPU":
            raise ValueError(f"{GPU_DEVICE_IDS} is for KIND_MODEL instances; a KIND_GPU "
                             "instance runs on the GPU Triton gives it (remove one of the two)")

    @classmethod
    def from_triton_args(cls, args: Mapping[str, str]) -> InstancePlacement:
        """From the Python backend's initialize() ``args`` (strings: "GPU", "0", and the
        model's config as JSON)."""
        kind = args.get("model_instance_kind", "MODEL")
        raw_id = args.get("model_instance_device_id", "0")
        try:
            device_id = int(raw_id)
        except ValueError:
            raise ValueError(f"model_instance_device_id must be an integer >= 0, "
                             f"got {raw_id!r}") from None
        parameters = json.loads(args.get("model_config", "{}")).get("parameters", {})
        listed = (parameters.get(GPU_DEVICE_IDS) or {}).get("string_value", "").strip()
        try:
            ids = tuple(int(i) for i in listed.split(",")) if listed else ()
        except ValueError:
            raise ValueError(f"{GPU_DEVICE_IDS} must be a comma-separated list of GPU "
                             f"indices such as \"0,1\", got {listed!r}") from None
        return cls(kind, device_id, ids)

    @property
    def uses_its_gpu(self) -> bool:
        """Whether Triton chose this instance's GPU (KIND_GPU), so that the engine must run
        there rather than where it likes."""
        return self.kind == "GPU"

    @property
    def gpus_asked(self) -> str:
        """What placed this instance on GPUs, in words ("" for the engine's default)."""
        if self.uses_its_gpu:
            return f"KIND_GPU on GPU {self.device_id}"
        return f"{GPU_DEVICE_IDS} {list(self.gpu_device_ids)}" if self.gpu_device_ids else ""


# An engine nobody placed: an in-process LLM (or a test's engine).
UNPLACED = InstancePlacement()


def rank_devices(placement: InstancePlacement, tensor_parallel_size: int,
                 num_cuda_devices: int) -> tuple[int, ...]:
    """The CUDA device index of each rank (rank r runs on the r-th), for an engine on CUDA
    that sees ``num_cuda_devices`` devices. More GPUs than exist is a ValueError naming the
    fields that ask for them."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    listed = placement.gpu_device_ids
    if listed:
        if len(listed) != tensor_parallel_size:
            raise ValueError(f"{GPU_DEVICE_IDS} lists {len(listed)} GPU(s) {list(listed)}, but "
                             f"tensor_parallel_size is {tensor_parallel_size}: list one per rank")
        devices = listed
        asked = f"{GPU_DEVICE_IDS} {list(listed)} names GPU {max(listed)}"
    elif placement.uses_its_gpu:
        first = placement.device_id
        devices = tuple(range(first, first + tensor_parallel_size))
        asked = (f"a KIND_GPU instance with model_instance_device_id {first} and "
                 f"tensor_parallel_size {tensor_parallel_size} needs GPUs {first}.."
                 f"{devices[-1]}")
    else:
        devices = tuple(range(tensor_parallel_size))
        asked = f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} GPUs"
    if max(devices) >= num_cuda_devices:
        raise ValueError(f"{asked}, but {_visible(num_cuda_devices)}")
    return devices


def _visible(count: int) -> str:
    if count == 0:
        return "no CUDA device is visible"
    if count == 1:
        return "only 1 CUDA device is visible (index 0)"
    return f"only {count} CUDA devices are visible (indices 0..{count - 1})"
