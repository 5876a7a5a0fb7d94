"""Engine arguments: one dataclass, validated in one place.

The names are vLLM's, so that a vllm_backend ``model.json`` with these keys works as is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pagedserve.config_vllm import check_unsupported
from pagedserve.placement import UNPLACED, InstancePlacement, rank_devices
from pagedserve.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
_DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn", "flashinfer")
# vLLM's names; "fp8" is e4m3 (as on CUDA in vLLM). Each maps to the cache's storage format.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_KV_CACHE_CANONICAL = {"fp8": "fp8_e4m3"}
# vLLM's executor names: uni (one process), mp (a process per rank on this machine), ray (Ray
# actors, on any machine of a Ray cluster); auto: uni for one rank, mp for several that fit this
# machine, ray for more.
EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")
_INSTALL_RAY = "pip install 'pagedserve[ray]' (or pip install ray)"
# What each field annotation accepts (annotations are strings here: postponed evaluation).
_ACCEPTED_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str, Path),
    "Optional[str]": (str, Path, type(None)),
    "int": (int,),
    "Optional[int]": (int, type(None)),
    "float": (float, int),
    "bool": (bool,),
    "Optional[bool]": (bool, type(None)),
    "Optional[dict]": (dict, type(None)),
}

_INT32_MAX = 2**31 - 1  # token positions, block ids and counts are int32 arrays
# Every integer argument's range, inclusive (None, where allowed, means "derive it").
_INT_RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, 2**64 - 1),  # what torch's generators take
    "max_num_seqs": (1, _INT32_MAX),
    "max_num_batched_tokens": (1, _INT32_MAX),
    "max_model_len": (1, _INT32_MAX),
    "num_kv_blocks": (2, _INT32_MAX),
    "kv_cache_memory_bytes": (1, 2**63 - 1),
    "max_logprobs": (-1, _INT32_MAX),
    "tensor_parallel_size": (1, 1024),
}


@dataclass
class EngineArgs:
    """Every knob of the engine; ``LLM(...)`` and ``model.json`` take the same names."""

    model: str
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    # Schedule and prepare step N+1 while the device runs step N; None: on for CUDA.
    async_scheduling: Optional[bool] = None
    # The most logprobs a request may ask for (vLLM's name and default); -1: no cap.
    max_logprobs: int = 20
    # Where and which checkpoint: a directory, or a hub id found in the local Hugging Face
    # cache (download_dir, else HF_HUB_CACHE / HF_HOME); nothing is downloaded.
    revision: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    download_dir: Optional[str] = None
    trust_remote_code: bool = False
    # Attention here is always full, so a sliding-window model is served no further than its
    # window, as vLLM serves it with disable_sliding_window=true; either value does that.
    disable_sliding_window: bool = False
    # Request logging at INFO: enable_log_requests (vLLM's AsyncEngineArgs), or the older
    # disable_log_requests=false; off by default. Engine stats every 10 s unless disabled.
    enable_log_requests: Optional[bool] = None
    disable_log_requests: Optional[bool] = None
    disable_log_stats: bool = True
    # vLLM's name of the checkpoint's quantization method (gptq, awq, auto-round,
    # compressed-tensors; gptq_marlin/awq_marlin are taken as gptq/awq); None: what the
    # checkpoint says. One that disagrees with the checkpoint fails the load.
    quantization: Optional[str] = None
    # What the KV cache stores: auto (the model's dtype) or fp8 (fp8_e4m3, fp8_e5m2): half the
    # bytes of bf16/fp16 per block, with per-layer k/v scales from the checkpoint (default 1.0).
    kv_cache_dtype: str = "auto"
    # Ranks one model is split over (heads, columns, vocabulary); several run in worker
    # processes (distributed_executor_backend mp) or Ray actors (ray): see the README's
    # "Scaling".
    tensor_parallel_size: int = 1
    # Who runs the ranks (EXECUTOR_BACKENDS); None is auto.
    distributed_executor_backend: Optional[str] = None
    # A tensor-parallel collective that waits longer than this fails the engine instead of
    # hanging it (a hung worker).
    distributed_timeout_seconds: float = 30.0
    # Speculative decoding (vLLM's mapping: method, num_speculative_tokens, prompt_lookup_min,
    # prompt_lookup_max, model, ...; see spec_decode/config.py). Async scheduling is off with it.
    speculative_config: Optional[dict] = None

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"engine argument {name!r} {why}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            value, accepted = getattr(self, f.name), _ACCEPTED_TYPES[f.type]
            # bool is an int to Python, but true/false is no block size.
            if not isinstance(value, accepted) or (
                isinstance(value, bool) and bool not in accepted
            ):
                raise bad(f.name, f"has the wrong type (expected {f.type})")
        self.model = str(self.model)
        if not self.model:
            raise bad("model", "must name a model directory")
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"must be one of {', '.join(_DTYPES)}")
        if self.device not in _DEVICES:
            raise bad("device", f"must be one of {', '.join(_DEVICES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise bad("attention_backend", f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            # 256 is what FlashAttention-2's paged KV cache needs.
            raise bad("block_size", "must be one of 8, 16, 32, 64, 128, 256")
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise bad(name, f"must be in [{low}, {high}]")
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise bad(
                "max_num_batched_tokens",
                f"must be >= max_model_len ({self.max_model_len}) without chunked prefill",
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:  # also false for nan
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        self._validate_parallelism(bad)
        if (self.enable_log_requests is not None and self.disable_log_requests is not None
                and self.enable_log_requests == self.disable_log_requests):
            raise bad("enable_log_requests",
                      f"contradicts disable_log_requests={self.disable_log_requests}")
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)
        for name in ("model", "tokenizer", "revision", "tokenizer_revision", "download_dir"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise bad(name, "must not be empty")

    def _validate_parallelism(self, bad: Any) -> None:
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise bad("distributed_executor_backend",
                      f"must be one of {', '.join(EXECUTOR_BACKENDS)}")
        if backend == "ray" and not ray_installed():
            raise bad("distributed_executor_backend",
                      f"names the Ray executor, but ray is not installed: {_INSTALL_RAY}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise bad("distributed_executor_backend",
                      f"uni runs one rank; tensor_parallel_size {self.tensor_parallel_size} "
                      "needs mp, ray (or auto)")
        if not 0.0 < self.distributed_timeout_seconds < float("inf"):
            raise bad("distributed_timeout_seconds", "must be a positive number of seconds")

    @property
    def log_requests(self) -> bool:
        """Whether requests are logged as they arrive and finish."""
        if self.enable_log_requests is not None:
            return self.enable_log_requests
        return self.disable_log_requests is False

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: Optional[Path] = None) -> EngineArgs:
        """Builds EngineArgs from a mapping such as model.json; unknown keys are an error.

        A relative ``model``/``tokenizer`` path is resolved against ``base_dir`` when given.
        """
        values = check_unsupported(_resolve_aliases(values))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown engine argument(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        if "model" not in values:
            raise ValueError("engine argument 'model' is required")
        if base_dir is not None:
            for key in ("model", "tokenizer"):
                if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                    candidate = Path(base_dir) / values[key]
                    if candidate.exists():
                        values[key] = str(candidate)
            # A draft model (speculative_config's model) is found as model.json's own.
            spec = values.get("speculative_config")
            draft = spec.get("model") if isinstance(spec, dict) else None
            if isinstance(draft, str) and draft and not Path(draft).is_absolute():
                candidate = Path(base_dir) / draft
                if candidate.exists():
                    values["speculative_config"] = {**spec, "model": str(candidate)}
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: Path | str) -> EngineArgs:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of engine arguments")
        return cls.from_dict(values, base_dir=path.parent)


# vLLM's names for what pagedserve calls otherwise.
_ALIASES = {"num_gpu_blocks_override": "num_kv_blocks"}


def _resolve_aliases(values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    for alias, name in _ALIASES.items():
        if alias not in values:
            continue
        value = values.pop(alias)
        if value is None:
            continue
        if values.get(name) is not None and values[name] != value:
            raise ValueError(
                f"engine arguments {alias!r} ({value}) and {name!r} ({values[name]}) disagree; "
                f"{alias} is vLLM's name for {name}"
            )
        values[name] = value
    return values


@dataclass(frozen=True)
class EngineConfig:
    """EngineArgs resolved against the model and the machine: what the engine actually runs."""

    args: EngineArgs
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" | "float16" | "bfloat16"
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    async_scheduling: bool
    # "fp8_e4m3" | "fp8_e5m2", or the model's dtype (as ``dtype``) for auto.
    kv_cache_dtype: str
    speculative: Optional[SpeculativeConfig] = None
    # Who runs the ranks: uni, mp or ray (distributed_executor_backend, auto resolved).
    executor_backend: str = "uni"
    # The CUDA device index of each tensor-parallel rank, as the rank's process numbers them
    # (placement.py; a Ray actor sees only its own GPU, its device 0); () on the CPU.
    devices: tuple[int, ...] = ()

    @property
    def max_blocks_per_req(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def rank_device(self, rank: int) -> str:
        """The torch device ``rank`` runs on: "cpu", or "cuda:<index>" (never bare "cuda",
        which means whichever device a thread has current)."""
        return f"cuda:{self.devices[rank]}" if self.device == "cuda" else "cpu"


def resolve_engine_config(
    args: EngineArgs,
    max_position_embeddings: int,
    checkpoint_dtype: str,
    sliding_window: Optional[int] = None,
    cuda_device_count: int = 0,
    quantized: bool = False,
    placement: InstancePlacement = UNPLACED,
) -> EngineConfig:
    """Fills in the ``auto`` choices and checks the arguments against the model and the
    machine (``cuda_device_count`` visible CUDA devices; ``placement``: where Triton put the
    instance, if it did)."""
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_device_count else "cpu"
    elif device == "cuda" and not cuda_device_count:
        raise ValueError("engine argument 'device' is 'cuda' but no CUDA device is available")
    executor_backend = _executor_backend(args, device, cuda_device_count)
    devices: tuple[int, ...] = ()
    if device == "cuda":
        # Ray places the other ranks, each on a GPU of its own (its device 0): this machine's
        # GPUs are rank 0's only.
        here = 1 if executor_backend == "ray" else args.tensor_parallel_size
        devices = rank_devices(placement, here, cuda_device_count)
        devices += (0,) * (args.tensor_parallel_size - here)
    elif placement.uses_its_gpu or placement.gpu_device_ids:
        # vllm_backend loads such an instance too (its CUDA_VISIBLE_DEVICES is then moot).
        logger.warning("the instance's GPUs (%s) are not used: engine argument 'device' is "
                       "'cpu'", placement.gpus_asked)
    canonical = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
                 "bf16": "bfloat16"}
    dtype = canonical.get(args.dtype, args.dtype)
    if dtype == "auto":
        dtype = checkpoint_dtype
        # fp16 matmuls are slow or missing on CPUs; keep the checkpoint's range in fp32 instead.
        # torch's CPU weight-only int kernels are vectorized for bfloat16 activations only
        # (float32 runs several times slower than the dense fp32 model): quantized -> bf16.
        if device == "cpu" and quantized:
            dtype = "bfloat16"
        elif device == "cpu" and dtype == "float16":
            dtype = "float32"
    limit = max_position_embeddings
    if sliding_window:
        # Attention here is full: serve no further than the window, where the two agree.
        limit = min(limit, int(sliding_window))
    max_model_len = args.max_model_len or limit
    if max_model_len > limit:
        raise ValueError(
            f"engine argument 'max_model_len' ({max_model_len}) exceeds what the model supports "
            f"({limit})"
        )
    max_num_batched_tokens = args.max_num_batched_tokens
    if not args.enable_chunked_prefill and max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"engine argument 'max_num_batched_tokens' ({max_num_batched_tokens}) must be at "
            f"least max_model_len ({max_model_len}) when chunked prefill is disabled"
        )
    speculative = (None if args.speculative_config is None
                   else SpeculativeConfig.from_dict(args.speculative_config))
    async_scheduling = (
        # Off on the CPU, where nothing runs asynchronously and it would only compute one
        # extra token per finishing request (and, with several ranks, each step would add a
        # broadcast of its tokens, which gloo makes dear: ~0.25 ms).
        device == "cuda"
        if args.async_scheduling is None else args.async_scheduling
    )
    if speculative is not None and async_scheduling:
        # A verification step emits a number of tokens only its end knows, and the next
        # step's drafts are proposed from them: the next step cannot be prepared before.
        if args.async_scheduling:
            logger.warning("async_scheduling is turned off: speculative decoding needs each "
                           "step's tokens before it schedules the next")
        async_scheduling = False
    return EngineConfig(
        args=args,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_dtype=(dtype if args.kv_cache_dtype == "auto"
                        else _KV_CACHE_CANONICAL.get(args.kv_cache_dtype, args.kv_cache_dtype)),
        async_scheduling=async_scheduling,
        speculative=speculative,
        executor_backend=executor_backend,
        devices=devices,
    )


def ray_installed() -> bool:
    """Whether the Ray executor can run here (ray importable), without importing it."""
    return importlib.util.find_spec("ray") is not None


def _executor_backend(args: EngineArgs, device: str, cuda_device_count: int) -> str:
    """distributed_executor_backend with auto resolved: uni for one rank; mp while the ranks
    fit this machine (on the CPU they always do, on CUDA one GPU each); ray past that."""
    backend = args.distributed_executor_backend
    tp = args.tensor_parallel_size
    if backend not in (None, "auto"):
        return backend
    if tp == 1:
        return "uni"
    if device == "cpu" or tp <= cuda_device_count:
        return "mp"
    if not ray_installed():
        raise ValueError(
            f"engine argument 'tensor_parallel_size' ({tp}) needs more GPUs than this machine "
            f"has ({cuda_device_count}): ranks on other machines run on Ray "
            f"(distributed_executor_backend auto or ray), which is not installed: {_INSTALL_RAY}")
    return "ray"
