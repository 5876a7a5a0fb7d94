"""GPU benchmark table for a 1B-class Llama-shaped model with random bf16 weights.

    python benchmarks/gpu_bench.py [--json out.json] [--markdown docs/benchmarks.md]

Measures: decode tokens/s at batch 1, 8, 64 eager, with CUDA graphs, and with CUDA graphs and
async scheduling (whether greedy tokens differ between the three is counted); each decode step's
time against the roofline (weight bytes + KV bytes read, over the measured device-to-device
copy bandwidth); offline throughput on the scaled-up request mix against HF transformers
`generate` on the same GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from typing import Any, Optional

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.devtools.workload import WORKLOADS, make_requests, model_dir

DECODE_BATCHES = (1, 8, 64)
DECODE_PROMPT_LEN = 512
DECODE_STEPS = 64


def synchronize(device: torch.device | str = "cuda") -> None:
    """Waits for the device's queued work (a no-op on the CPU, whose ops run in order)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 2 * 1024**3) -> float:
    """Bytes read plus written per second by a large device-to-device copy (on the CPU, a
    memory-to-memory copy: the ``--smoke`` runs of the benchmarks)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(10):
        if src.is_cuda:
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - begin)
    times.sort()
    bandwidth = 2 * src.numel() * src.element_size() / times[len(times) // 2]
    del src, dst
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return bandwidth


def decode_step_time(
    llm: LLM, batch: int, prompt_len: int = DECODE_PROMPT_LEN, steps: int = DECODE_STEPS
) -> tuple[float, dict[str, list[int]]]:
    """Seconds per step once ``batch`` requests are all decoding (steps timed back to back, as
    they run: with async scheduling a step overlaps the host work of the next), and the
    first tokens each request generated."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 16, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    span = min(30000, llm.engine.model_config.vocab_size - 10)
    for i, rid in enumerate(ids):
        prompt = [(7 * i + j) % span + 10 for j in range(prompt_len)]
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(4):
        synchronize(llm.engine.config.device)
        start = time.perf_counter()
        for _ in range(steps // 4):
            engine.step()
        synchronize(llm.engine.config.device)
        times.append((time.perf_counter() - start) / (steps // 4))
    tokens = {rid: list(engine.scheduler.requests[rid].output_token_ids[:steps])
              for rid in ids}
    engine.abort_request(list(engine.output_processor.states))
    while engine.has_unfinished_requests():
        engine.step()
    times.sort()
    return times[len(times) // 2], tokens


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not llm.engine.model_config.tie_word_embeddings:
            continue  # an embedding lookup reads only the batch's rows
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(llm: LLM) -> int:
    mc = llm.engine.model_config
    element = llm.engine.runner.kv_caches[0].element_size()
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * element


DECODE_CONFIGS = (  # (CUDA graphs, async scheduling); tokens are compared with the first
    (True, False), (True, True), (False, False),
)


def decode_table(path: str, bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    reference: dict[int, dict[str, list[int]]] = {}
    for graphs, overlap in DECODE_CONFIGS:
        llm = LLM(path, dtype="bfloat16", enforce_eager=not graphs, async_scheduling=overlap,
                  max_num_seqs=64, max_model_len=2048, kv_cache_memory_bytes=8 << 30)
        wbytes, kv_token = weight_bytes(llm), kv_bytes_per_token(llm)
        for batch in DECODE_BATCHES:
            step, tokens = decode_step_time(llm, batch)
            # Async scheduling must not change greedy tokens; count the requests that differ
            # from the graphs-only run. (Eager steps may split attention differently, so in
            # bf16 they can differ legitimately.)
            reference.setdefault(batch, tokens)
            mismatched = sum(tokens[r] != reference[batch][r] for r in tokens)
            context = DECODE_PROMPT_LEN + 16 + DECODE_STEPS // 2
            roofline = (wbytes + batch * context * kv_token) / bandwidth
            rows.append(dict(batch=batch, cuda_graphs=graphs, async_scheduling=overlap,
                             step_ms=step * 1e3, tok_s=batch / step,
                             roofline_ms=roofline * 1e3, roofline_frac=roofline / step,
                             mismatched_requests=mismatched))
            print(rows[-1], flush=True)
        del llm  # the next engine sizes its KV cache from the memory this one frees
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def offline_table(path: str, num_hf_requests: int) -> dict[str, Any]:
    from offline_throughput import run_engine, run_hf  # the sibling script in benchmarks/

    spec = WORKLOADS["gpu-1b"]
    requests = make_requests(spec, 32000)
    engine_tps = run_engine(path, requests, dict(dtype="bfloat16", max_num_seqs=256,
                                                 gpu_memory_utilization=0.8))
    gc.collect()
    torch.cuda.empty_cache()
    subset = requests[:num_hf_requests]
    hf_tps = run_hf(path, subset, 16, "cuda", torch.bfloat16)
    return dict(engine_tok_s=engine_tps, engine_requests=len(requests), hf_tok_s=hf_tps,
                hf_requests=len(subset), ratio=engine_tps / hf_tps)


def markdown(card: str, bandwidth: float, decode: list[dict], offline: Optional[dict]) -> str:
    lines = [f"## {card}, {datetime.date.today().isoformat()}", "",
             f"Measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write).", "",
             "| batch | CUDA graphs | async scheduling | step ms | tok/s | roofline ms "
             "| % of roofline | tokens differ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in decode:
        lines.append(f"| {r['batch']} | {'yes' if r['cuda_graphs'] else 'no'} | "
                     f"{'yes' if r['async_scheduling'] else 'no'} | "
                     f"{r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['roofline_ms']:.2f} | "
                     f"{100 * r['roofline_frac']:.0f}% | {r['mismatched_requests']} |")
    if offline:
        lines += ["", f"Offline throughput (gpu-1b mix): engine {offline['engine_tok_s']:.0f} "
                      f"tok/s over {offline['engine_requests']} requests; HF generate "
                      f"{offline['hf_tok_s']:.0f} tok/s over its first {offline['hf_requests']} "
                      f"(batches of 16); ratio {offline['ratio']:.1f}x."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    parser.add_argument("--hf-requests", type=int, default=32)
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    path = str(model_dir("gpu-1b"))
    bandwidth = measure_copy_bandwidth()
    decode = decode_table(path, bandwidth)
    offline = None if args.skip_offline else offline_table(path, args.hf_requests)
    table = markdown(card, bandwidth, decode, offline)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, bandwidth=bandwidth, decode=decode, offline=offline), f,
                      indent=2)


if __name__ == "__main__":
    main()
