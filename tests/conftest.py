"""Shared pytest fixtures. Each section is owned by the part of the code base it serves."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Dict, NamedTuple

import pytest
from hf_reference import TINY_ARCHS, TINY_MODEL_KINDS

# --------------------------------------------------------------------------------------------
# Tiny random-weight checkpoints (pagedserve.devtools.tiny_model; HF parity harness)
# --------------------------------------------------------------------------------------------


class TinyModel(NamedTuple):
    arch: str
    tokenizer: str
    path: pathlib.Path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., pathlib.Path]:
    """Factory `tiny_model_dir(arch="llama", tokenizer="bpe", **build_kwargs) -> Path`.

    Each distinct argument set is built once per session (under a session tmp dir) with
    `build_tiny_model`. The seed defaults to the arch's index in TINY_ARCHS, so that llama and
    mistral (the same network without a sliding window) do not get identical weights.
    """
    from pagedserve.devtools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    built: Dict[str, pathlib.Path] = {}

    def get(arch: str = "llama", tokenizer: str = "bpe", **build_kwargs: Any) -> pathlib.Path:
        build_kwargs.setdefault("seed", TINY_ARCHS.index(arch) if arch in TINY_ARCHS else 0)
        key = json.dumps([arch, tokenizer, build_kwargs], sort_keys=True, default=repr)
        if key not in built:
            path = root / f"{arch}-{tokenizer}-{len(built)}"
            built[key] = build_tiny_model(path, arch, tokenizer=tokenizer, **build_kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session", params=TINY_MODEL_KINDS, ids=lambda k: f"{k[0]}-{k[1]}")
def tiny_model(request, tiny_model_dir) -> TinyModel:
    """Every (arch, tokenizer kind) the tiny checkpoints come in, default sizes."""
    arch, tokenizer = request.param
    return TinyModel(arch, tokenizer, tiny_model_dir(arch, tokenizer))
