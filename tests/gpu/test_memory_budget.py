"""The KV-cache budget on a real GPU: the worst step the engine can run stays within
gpu_memory_utilization, and memory another process holds is accounted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GIB = 1 << 30
HOG = """
import sys, time, torch
block = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def big_vocab_model(tiny_model_dir):
    # A Qwen-sized vocabulary makes the sampler's [rows, vocab] buffers the largest memory of
    # a step, as with real checkpoints.
    return tiny_model_dir("llama", "bpe", vocab_size=152064)


def test_the_worst_step_stays_within_the_share(big_vocab_model):
    share = 0.06
    free, total = torch.cuda.mem_get_info()
    if free < 2 * share * total:
        pytest.skip("the device is busy")
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    llm = LLM(str(big_vocab_model), gpu_memory_utilization=share, max_num_seqs=256,
              max_num_batched_tokens=2048, enforce_eager=True)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.1, presence_penalty=0.1,
                            frequency_penalty=0.1, logprobs=20, min_tokens=2, max_tokens=3)
    # 256 requests sample in the same steps: the step the profile had to foresee.
    prompts = [{"prompt_token_ids": [4 + i % 500] * 8} for i in range(256)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    peak = torch.cuda.max_memory_allocated() - allocated_before
    print(f"\npeak {peak / GIB:.2f} GiB of a {share * total / GIB:.2f} GiB share")
    assert peak <= share * total
    del llm
    torch.cuda.empty_cache()


def test_memory_held_by_another_process_is_accounted(big_vocab_model):
    free, total = torch.cuda.mem_get_info()
    if free < 8 * GIB:
        pytest.skip("the device is busy")
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(4 * GIB)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "ready"
        free, total = torch.cuda.mem_get_info()
        # A share larger than what the other process left free.
        share = min(0.99, (free + 2 * GIB) / total)
        with pytest.raises(ValueError, match="gpu_memory_utilization.*other processes"):
            LLM(str(big_vocab_model), gpu_memory_utilization=share, enforce_eager=True)
    finally:
        hog.kill()
        hog.wait()
    torch.cuda.empty_cache()
