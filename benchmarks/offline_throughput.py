"""Offline throughput of the engine, against HF transformers `generate` side by side.

    python benchmarks/offline_throughput.py --preset cpu-small --compare hf [--json out.json]
    python benchmarks/offline_throughput.py --preset cpu-small --null-model

Throughput counts generated tokens only (each request its own output length) over wall time.
`--null-model` swaps the forward for a no-op and reports the engine's own cost per step
(schedule + input preparation + output processing; greedy sampling is timed apart) with 256
running decodes, for offline (final-only) and streamed (delta) outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional

import torch

from pagedserve import LLM, RequestOutputKind, SamplingParams
from pagedserve.devtools.workload import WORKLOADS, BenchRequest, make_requests, model_dir


class EngineRunner:
    """The engine loaded once; each call generates the whole request list and times it."""

    def __init__(self, path: str, requests: list[BenchRequest], engine_kwargs: dict[str, Any]):
        self.llm = LLM(path, **engine_kwargs)
        self.requests = requests
        self.params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
                       for r in requests]
        self.prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        self.llm.generate(self.prompts[:2], self.params[:2], use_tqdm=False)  # warm-up

    def __call__(self) -> float:
        self.llm.reset_prefix_cache()  # every run computes every prompt
        start = time.perf_counter()
        outputs = self.llm.generate(self.prompts, self.params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        expected = sum(r.output_len for r in self.requests)
        assert produced == expected, f"engine produced {produced} tokens, expected {expected}"
        return produced / elapsed


class HFRunner:
    """HF transformers `generate` on the same requests: batches left-padded, each request
    counting only its own output length, every batch run to its longest output."""

    def __init__(self, path: str, requests: list[BenchRequest], batch_size: int, device: str,
                 dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        config = self.model.config
        self.pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.requests, self.batch_size, self.device = requests, batch_size, device
        self._generate(requests[:2])  # warm-up

    def _generate(self, batch: list[BenchRequest]) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids):] = 1
        longest = max(r.output_len for r in batch)
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                do_sample=False, max_new_tokens=longest,
                                min_new_tokens=longest, pad_token_id=self.pad)

    def __call__(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(self.requests), self.batch_size):
            self._generate(self.requests[i:i + self.batch_size])
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return sum(r.output_len for r in self.requests) / elapsed


def run_engine(path: str, requests: list[BenchRequest], engine_kwargs: dict[str, Any]) -> float:
    return EngineRunner(path, requests, engine_kwargs)()


def run_hf(path: str, requests: list[BenchRequest], batch_size: int, device: str,
           dtype: torch.dtype) -> float:
    return HFRunner(path, requests, batch_size, device, dtype)()


class NullModel(torch.nn.Module):
    """Stands in for the model: no arithmetic, preallocated outputs of the right shapes."""

    def __init__(self, hidden_size: int, vocab_size: int, max_tokens: int) -> None:
        super().__init__()
        self.hidden = torch.zeros(max_tokens, hidden_size)
        self.logits = torch.zeros(max_tokens, vocab_size)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]


class PhaseTimer:
    """Wraps named methods and sums the wall time spent inside each, and counts the calls."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def wrap(self, owner: Any, method: str, phase: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start
                self.counts[phase] = self.counts.get(phase, 0) + 1

        setattr(owner, method, timed)


def null_model_overhead(path: str, num_seqs: int, steps: int,
                        output_kind: RequestOutputKind) -> dict[str, float]:
    llm = LLM(path, max_num_seqs=num_seqs, max_model_len=1024)
    engine = llm.engine
    mc = engine.model_config
    engine.runner.model = NullModel(mc.hidden_size, mc.vocab_size,
                                    engine.config.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True,
                            output_kind=output_kind)
    for i in range(num_seqs):
        engine.add_request(f"n{i}", {"prompt_token_ids": [5 + i % 100] * 16}, params)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(5):
        engine.step()
    assert len(engine.scheduler.running) == num_seqs
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "_prepare_inputs", "prepare_inputs")
    timer.wrap(engine.runner, "_forward_logits", "null_forward")
    timer.wrap(engine.runner, "sampler", "sample")
    timer.wrap(engine.scheduler, "update_from_output", "update")
    timer.wrap(engine.output_processor, "process", "outputs")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    times.sort()
    phases = {k: 1e3 * v / steps for k, v in timer.totals.items()}
    step_ms = 1e3 * sum(times) / steps
    return {"median_ms": 1e3 * times[len(times) // 2], "mean_ms": step_ms,
            "overhead_ms": step_ms - phases["null_forward"] - phases["sample"],
            "phases_ms": phases, "num_running": num_seqs}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small", choices=sorted(WORKLOADS))
    parser.add_argument("--compare", choices=["hf"], default=None)
    parser.add_argument("--null-model", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate engine and HF runs this many times; report medians")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = parser.parse_args(argv)

    spec = WORKLOADS[args.preset]
    path = str(model_dir(spec.preset))
    result: dict[str, Any] = {}
    if args.null_model:
        for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
            figures = null_model_overhead(path, num_seqs=256, steps=100, output_kind=kind)
            result[kind.name.lower()] = figures
            phases = ", ".join(f"{k} {v:.3f}" for k, v in figures["phases_ms"].items())
            print(f"{kind.name} outputs, {figures['num_running']} running decodes: step "
                  f"{figures['mean_ms']:.3f} ms mean ({figures['median_ms']:.3f} median); "
                  f"engine overhead (step - null forward - sampling) "
                  f"{figures['overhead_ms']:.3f} ms\n  per phase (ms): {phases}")
    else:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        requests = make_requests(spec, vocab)
        if args.num_requests:
            requests = requests[: args.num_requests]
        kwargs: dict[str, Any] = {}
        if args.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        engine = EngineRunner(path, requests, kwargs)
        hf = None
        if args.compare == "hf":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            hf = HFRunner(path, requests, args.hf_batch_size, device, dtype)
        # Alternate the two so that both see the same (noisy) machine; report medians.
        engine_runs, hf_runs = [], []
        for _ in range(args.repeat):
            engine_runs.append(engine())
            print(f"engine: {engine_runs[-1]:.1f} tok/s ({len(requests)} requests)")
            if hf is not None:
                hf_runs.append(hf())
                print(f"hf generate: {hf_runs[-1]:.1f} tok/s")
        result["engine_tok_s"] = statistics.median(engine_runs)
        if hf_runs:
            result["hf_tok_s"] = statistics.median(hf_runs)
            result["ratio"] = statistics.median(e / h for e, h in zip(engine_runs, hf_runs))
            print(f"median of {args.repeat}: engine {result['engine_tok_s']:.1f} tok/s, hf "
                  f"{result['hf_tok_s']:.1f} tok/s, ratio engine/hf = {result['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
