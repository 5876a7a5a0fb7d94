"""Builds a model on its device and fills it from a checkpoint directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.attention.base import AttentionBackend
from pagedserve.attention.layer import Attention
from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup
from pagedserve.layers.embedding import LMHead, VocabEmbedding
from pagedserve.layers.linear import LinearBase
from pagedserve.layers.quantization import QuantizationConfig
from pagedserve.models.eagle3 import Eagle3Config, Eagle3LlamaForCausalLM
from pagedserve.models.model_config import ModelConfig
from pagedserve.models.registry import eagle3_head_class, model_class


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: sharded safetensors, one safetensors, or .bin files."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def iterate_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def read_weight(path: Path, name: str) -> torch.Tensor:
    """One tensor of a checkpoint, read alone where the format allows (safetensors)."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    return f.get_tensor(name)
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True)
            if name in weights:
                return weights[name]
    raise ValueError(f"checkpoint {path} holds no tensor {name!r}")


def load_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    attn: AttentionBackend,
    quant_config: Optional[QuantizationConfig] = None,
    cls: Optional[type[nn.Module]] = None,
    tp: TensorParallelGroup = SINGLE_RANK,
) -> nn.Module:
    """Instantiates the architecture's class (or ``cls``) on ``device`` and loads every
    parameter (``quant_config`` chooses each linear layer's method; None: all unquantized).
    With a ``tp`` group of several ranks (``config`` from with_tensor_parallel) the model is
    this rank's part, and each parameter's loader takes the rank's part of its tensors."""
    cls = cls or model_class(config.architecture)
    with torch.device(device):
        if tp.world_size == 1:
            model = cls(config, attn, quant_config, dtype)
        else:
            model = cls(config, attn, quant_config, dtype, tp=tp)
    loaded = model.load_weights(iterate_weights(config.path))
    # A parameter marked optional (GPTQ's g_idx) may be absent from a checkpoint.
    required = {n for n, p in model.named_parameters() if not getattr(p, "optional", False)}
    missing = sorted(required - loaded)
    if missing:
        raise ValueError(f"checkpoint {config.path} lacks weights for: {', '.join(missing[:8])}")
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.linear_method.process_weights_after_loading(module)
        elif isinstance(module, (LMHead, Attention)):
            module.process_weights_after_loading()
    return model.eval()


def load_eagle3_head(
    head: Eagle3Config,
    target: nn.Module,
    target_path: Path,
    dtype: torch.dtype,
    device: torch.device,
    attn: AttentionBackend,
) -> Eagle3LlamaForCausalLM:
    """Loads an EAGLE-3 head on ``device`` (``attn`` built for the head's heads and head_dim)
    and gives it ``target``'s token embedding when its checkpoint has none. The target must
    still be told to return the head's aux layers (set_aux_hidden_state_layers)."""
    cls = eagle3_head_class(head.model_config.architecture)
    model = load_model(head.model_config, dtype, device, attn, cls=cls)
    assert isinstance(model, Eagle3LlamaForCausalLM)
    if model.embed_tokens is None:
        embedding = target.model.embed_tokens
        if embedding.tp.world_size > 1:
            # The target's rank holds a slice of the vocabulary, and the head drafts on rank 0
            # alone: it gets its own copy of the whole table, read from the target's checkpoint.
            embedding = _whole_embedding(head.model_config, target, target_path, embedding,
                                         dtype, device)
        model.share_embedding(embedding)
    return model


def _whole_embedding(config: ModelConfig, target: nn.Module, path: Path,
                     sharded: VocabEmbedding, dtype: torch.dtype,
                     device: torch.device) -> VocabEmbedding:
    """``sharded``'s table whole (``config``'s vocabulary and width), on one rank, read from
    ``target``'s checkpoint at ``path``."""
    name = next(n for n, p in target.named_parameters() if p is sharded.weight)
    with torch.device(device):
        whole = VocabEmbedding(config.vocab_size, config.hidden_size, dtype)
    whole.weight.weight_loader(whole.weight, read_weight(path, name))
    return whole
