"""What the engine needs to know about a Hugging Face checkpoint, read from its config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pagedserve.attention.layer import check_kv_cache_scheme
from pagedserve.layers.quantization import QuantizationConfig, parse_quantization

_DTYPE_NAMES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


@dataclass
class ModelConfig:
    """The architecture-level facts of a checkpoint (shapes, rope, special tokens)."""

    path: Path
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    qk_norm: bool
    mlp_bias: bool
    checkpoint_dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    # The attention window, or None for full attention (Qwen2-style configs carry a window
    # that use_sliding_window=false turns off).
    sliding_window: Optional[int] = None
    # The checkpoint's quantization (None: full-precision weights).
    quant_config: Optional[QuantizationConfig] = None
    # compressed-tensors' kv_cache_scheme: the checkpoint carries fp8 KV-cache scales.
    kv_cache_scheme: Optional[dict[str, Any]] = None
    # The ranks the model is split over (with_tensor_parallel); the per-rank shapes follow.
    tensor_parallel_size: int = 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def with_tensor_parallel(self, tensor_parallel_size: int) -> ModelConfig:
        """This config split over ``tensor_parallel_size`` ranks: each rank an equal share of
        the attention heads and of the MLP's intermediate size, and of the KV heads too where
        there are at least as many as ranks; fewer KV heads are replicated, each on
        ``tensor_parallel_size / num_kv_heads`` ranks. Fails naming tensor_parallel_size when
        the shapes do not divide."""
        tp = tensor_parallel_size
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        for name, size in (("num_attention_heads", self.num_heads),
                           ("intermediate_size", self.intermediate_size)):
            if size % tp:
                raise ValueError(f"tensor_parallel_size {tp} does not divide {name} ({size}) "
                                 f"of {self.path}")
        kv = self.num_kv_heads
        if (kv % tp if kv >= tp else tp % kv):
            raise ValueError(
                f"tensor_parallel_size {tp} does not fit num_key_value_heads ({kv}) of "
                f"{self.path}: it must divide them, or (to replicate them) be a multiple of them"
            )
        return dataclasses.replace(self, tensor_parallel_size=tp)

    @property
    def heads_per_rank(self) -> int:
        """The query heads each tensor-parallel rank computes."""
        return self.num_heads // self.tensor_parallel_size

    @property
    def kv_head_replicas(self) -> int:
        """How many ranks hold each KV head (more than 1 where KV heads are fewer than ranks)."""
        return max(1, self.tensor_parallel_size // self.num_kv_heads)

    @property
    def kv_heads_per_rank(self) -> int:
        """The KV heads each rank stores in its KV cache and attends with."""
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    @classmethod
    def from_pretrained(
        cls, path: Path | str, trust_remote_code: bool = False,
        quantization: Optional[str] = None,
    ) -> ModelConfig:
        """Reads ``path``/config.json; ``quantization`` (the engine argument) must agree with
        the checkpoint's quantization when given."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a model directory: it has no config.json")
        raw = json.loads(config_file.read_text())
        _check_remote_code(path, raw, trust_remote_code)
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(f"{config_file} names no architecture ('architectures' is empty)")
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = _rope(raw)
        arch = archs[0]
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            path=path,
            architecture=arch,
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama-family configs may ask for
            # biases everywhere; Qwen3 normalizes q and k per head.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            o_proj_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            checkpoint_dtype=_DTYPE_NAMES.get(str(dtype_name), torch.float32),
            eos_token_ids=_eos_ids(path, raw),
            sliding_window=_sliding_window(raw),
            quant_config=parse_quantization(path, raw, quantization),
            kv_cache_scheme=check_kv_cache_scheme(raw),
            raw=raw,
        )


def _sliding_window(raw: dict[str, Any]) -> Optional[int]:
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return None
    return int(window)


def _check_remote_code(path: Path, raw: dict[str, Any], trust_remote_code: bool) -> None:
    """A config whose model_type transformers does not know comes with its own code (the
    ``auto_map``); that code runs only with trust_remote_code, as in transformers and vLLM."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type in CONFIG_MAPPING or "AutoConfig" not in (raw.get("auto_map") or {}):
        return
    if not trust_remote_code:
        raise ValueError(
            f"the config of {path} (model_type {model_type!r}) needs its own code "
            f"({raw['auto_map']['AutoConfig']}); set the engine argument trust_remote_code=true "
            "to run it"
        )
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    except Exception as e:  # whatever the checkpoint's own code raises
        raise ValueError(f"the config code of {path} failed to load: {e}") from e


def _rope(raw: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    # transformers 5 writes rope_parameters (theta inside); older: rope_theta + rope_scaling.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def _eos_ids(path: Path, raw: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    sources = [raw.get("eos_token_id")]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids
