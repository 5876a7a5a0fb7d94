"""Where a batch-1 decode step's time goes on a GPU: graph replay alone vs the whole step.

    python benchmarks/graph_replay_probe.py
"""

from __future__ import annotations

import time

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.devtools.workload import model_dir


def main() -> None:
    llm = LLM(str(model_dir("gpu-1b")), dtype="bfloat16", max_num_seqs=8, max_model_len=2048,
              gpu_memory_utilization=0.3, async_scheduling=False)  # each step on its own
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("probe", {"prompt_token_ids": list(range(10, 522))}, params)
    for _ in range(8):
        engine.step()
    graphs = engine.runner.graphs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replay, steps = [], []
    for _ in range(50):
        start.record()
        graphs.replay(1)
        end.record()
        end.synchronize()
        replay.append(start.elapsed_time(end))
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        steps.append(1e3 * (time.perf_counter() - t))
    replay.sort()
    steps.sort()
    print(f"batch-1 graph replay (GPU time): {replay[25]:.3f} ms; whole engine step: "
          f"{steps[25]:.3f} ms; host share: {steps[25] - replay[25]:.3f} ms")


if __name__ == "__main__":
    main()
