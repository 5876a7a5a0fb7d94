"""Benchmark workloads: the requests and the locally built model they run on."""

from __future__ import annotations

import os
import pathlib
import random
from dataclasses import dataclass

from pagedserve.devtools.tiny_model import build_preset

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: its prompt ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    """A model preset and a random request mix."""

    preset: str
    num_requests: int
    prompt_len: tuple[int, int]  # inclusive range
    output_len: tuple[int, int]
    seed: int = 0


WORKLOADS = {
    # The CPU benchmark of the engine-core issue.
    "cpu-small": WorkloadSpec("cpu-small", 64, (32, 256), (16, 128)),
    # The same mix scaled up for a GPU.
    "gpu-1b": WorkloadSpec("gpu-1b", 512, (32, 2048), (16, 512)),
}


def model_dir(preset: str) -> pathlib.Path:
    """Builds (once) and returns the preset's checkpoint under .cache/models/ in the repo."""
    root = pathlib.Path(os.environ.get("PAGEDSERVE_CACHE", REPO_ROOT / ".cache"))
    path = root / "models" / preset
    if not (path / "config.json").is_file():
        build_preset(path, preset)
    return path


def make_requests(spec: WorkloadSpec, vocab_size: int, num_special: int = 4) -> list[BenchRequest]:
    """Random prompts (token ids past the special tokens) and output lengths, seeded."""
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_requests):
        prompt_len = rng.randint(*spec.prompt_len)
        prompt = [rng.randrange(num_special, vocab_size) for _ in range(prompt_len)]
        requests.append(BenchRequest(prompt, rng.randint(*spec.output_len)))
    return requests
