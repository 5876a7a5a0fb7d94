"""W8A8 / FP8 on CUDA (not run without a device): each producer fixture and online FP8 decode
the same under CUDA graphs as eagerly (no host syncs or data-dependent branches in the
quantized linears), and fp32 on CUDA (Triton scaled GEMM) stays within the CPU engine's top-5."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "quant"
NAMES = ["ct-fp8-block", "ct-fp8-dynamic", "ct-fp8-static", "ct-w8a8-int-dynamic",
         "ct-w8a8-int-static", "fp8-native-block", "fp8-native-tensor-static"]
PROMPTS = [[5, 17, 33, 9, 100, 7], [300, 2, 41], list(range(40, 71)), [9] * 50]


def checkpoint(name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path, ignore=shutil.ignore_patterns("reference_logits*"))
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "base" / file, path / file)
    return path


def generate(path: Path, **kwargs) -> list:
    llm = LLM(str(path), kv_cache_memory_bytes=64 << 20, max_num_seqs=8, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", NAMES + ["online-fp8"])
def test_cuda_graphs_equal_eager(name, dtype, tmp_path):
    path, extra = (FIXTURES / "base", {"quantization": "fp8"}) if name == "online-fp8" else (
        checkpoint(name, tmp_path), {})
    eager = generate(path, dtype=dtype, enforce_eager=True, **extra)
    graphs = generate(path, dtype=dtype, enforce_eager=False, **extra)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


@pytest.mark.parametrize("name", NAMES)
def test_cuda_fp32_tokens_within_the_cpu_top_5(name, tmp_path):
    path = checkpoint(name, tmp_path)
    cuda = generate(path, dtype="float32", device="cuda")
    cpu = generate(path, dtype="float32", device="cpu")
    for ours, ref in zip(cuda, cpu):
        for i, (token, theirs) in enumerate(zip(ours.token_ids, ref.token_ids)):
            assert token in ref.logprobs[i], f"position {i}: {token} not in the CPU's top 5"
            if token != theirs:
                break
