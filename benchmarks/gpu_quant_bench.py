"""GPU benchmark of the quantized paths: W4A16 and FP8 W8A8 GEMMs against bf16, and decode tok/s
of the 1B-class Llama in bf16, W4A16, FP8 and FP8 with an FP8 KV cache.

    python benchmarks/gpu_quant_bench.py [--json out.json] [--markdown docs/benchmarks.md]
    python benchmarks/gpu_quant_bench.py --smoke   # the same logic on the CPU, tiny shapes

GEMMs run through the layers the engine loads (``LinearBase`` with the GPTQ g128 and online-FP8
linear methods, their weights put through the methods' load code), timed as CUDA-graph replays
between CUDA events (no host sync inside the timed loop); each graph cycles through copies of
the weight that together exceed L2, so that every call reads its weight from HBM. W4A16's
achieved bandwidth counts the packed weight, its scales and zeros, the activations and the
output, over the measured copy bandwidth. The decode table uses gpu_bench's model and step
timing; the W4A16 checkpoint is written by ``quantized_model`` from the dense one (GPTQ v1,
4 bit, group 128) in a temp dir.
``--smoke`` runs everything on the CPU (the layers' CPU kernels, perf_counter timing, a tiny
model) so that the script's logic and output are checked without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import pathlib
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from gpu_bench import decode_step_time, measure_copy_bandwidth  # sibling script
from quant_bench import W4A16  # sibling script: the GPTQ g128 quantization_config

from pagedserve import LLM
from pagedserve.devtools.quantized_model import write_quantized
from pagedserve.devtools.tiny_model import build_preset
from pagedserve.devtools.workload import model_dir
from pagedserve.layers.linear import LinearBase
from pagedserve.layers.quantization.fp8_configs import Fp8Config
from pagedserve.layers.quantization.int_configs import GPTQConfig
from pagedserve.layers.quantization.packing import pack_cols, pack_rows

GROUP = 128
# The targets.
W4A16_BANDWIDTH_TARGET = 0.70  # of the copy bandwidth, at M=1 on the large shapes
FP8_SPEEDUP_TARGET = 1.5  # over bf16, at M >= 256
FP8_TARGET_MIN_M = 256
DECODE_W4A16_TARGET = 2.0  # batch-1 tok/s over bf16
DECODE_CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {}, "w4a16": {}, "fp8": {"quantization": "fp8"},
    "fp8 + fp8 kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}


@dataclass(frozen=True)
class Plan:
    """What one run measures: the device, the GEMM shapes (K, N) and M values, iterations, and
    the decode table's batches and lengths. ``large`` are the shapes the bandwidth target is
    judged on."""

    device: str
    shapes: tuple[tuple[int, int], ...]
    large: tuple[tuple[int, int], ...]
    w4a16_ms: tuple[int, ...]
    fp8_ms: tuple[int, ...]
    iters: int
    rotate_bytes: int  # weight bytes each timed sequence cycles through (beyond L2)
    copy_bytes: int
    decode_batches: tuple[int, ...]
    prompt_len: int
    decode_steps: int
    kv_cache_bytes: int


FULL = Plan(
    device="cuda", shapes=((4096, 4096), (4096, 14336), (8192, 28672)),
    large=((4096, 14336), (8192, 28672)), w4a16_ms=(1, 16, 64, 256), fp8_ms=(256, 1024, 4096),
    iters=20, rotate_bytes=256 << 20, copy_bytes=2 * 1024**3, decode_batches=(1, 64),
    prompt_len=256, decode_steps=32, kv_cache_bytes=4 << 30,
)
SMOKE = Plan(
    device="cpu", shapes=((128, 256), (256, 512)), large=((256, 512),), w4a16_ms=(1, 16),
    fp8_ms=(16,), iters=2, rotate_bytes=256 << 10, copy_bytes=16 << 20, decode_batches=(1, 4),
    prompt_len=16, decode_steps=8, kv_cache_bytes=64 << 20,
)


# ---- GEMMs ------------------------------------------------------------------------------------

def w4a16_layer(k: int, n: int, device: str) -> LinearBase:
    """A GPTQ v1 4-bit g128 layer of random values, with the method GPTQ's config picks, loaded
    through its loaders and converted by its load code to the internal layout."""
    prefix = "model.layers.0.mlp.up_proj"
    method = GPTQConfig.from_dict(W4A16).method_for(prefix)
    with torch.device(device):
        layer = LinearBase(k, [n], linear_method=method, dtype=torch.bfloat16, prefix=prefix)
        groups = k // GROUP
        gen = torch.Generator(device).manual_seed(0)
        values = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen, device=device)
        tensors = {
            "qweight": pack_rows(values, 4),
            "qzeros": pack_cols(torch.full((groups, n), 7, dtype=torch.int32), 4),  # v1: z - 1
            "scales": (torch.rand(groups, n, generator=gen, device=device) * 0.02 + 0.005).half(),
        }
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    method.process_weights_after_loading(layer)
    return layer


def fp8_layer(weight: torch.Tensor) -> LinearBase:
    """An online-FP8 layer (per-channel fp8 weights, dynamic per-token activations) of a bf16
    weight [N, K], quantized by the method's load code."""
    n, k = weight.shape
    prefix = "model.layers.0.mlp.up_proj"
    method = Fp8Config.quantize_at_load().method_for(prefix)
    with torch.device(weight.device):
        layer = LinearBase(k, [n], linear_method=method, dtype=weight.dtype, prefix=prefix)
    layer.weight.weight_loader(layer.weight, weight)
    method.process_weights_after_loading(layer)
    return layer


def w4a16_bytes(m: int, k: int, n: int) -> int:
    """Bytes a W4A16 GEMM must move: packed weight, bf16 scales, int32 zeros, bf16 in and out."""
    return k * n // 2 + (k // GROUP) * n * (2 + 4) + 2 * m * k + 2 * m * n


def time_calls(calls: list[Callable[[], torch.Tensor]], device: str,
               iters: int) -> tuple[float, str]:
    """Seconds per call, over ``calls`` run in turn (each on its own copy of the weight, so
    that back-to-back calls read from memory, not from L2), and how they were timed: on CUDA
    the sequence captured once and replayed ``iters`` times between two events (eager launches
    between events if capture fails); on the CPU, wall time."""

    def run_all() -> None:
        for call in calls:
            call()

    run_all()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            run_all()
        return (time.perf_counter() - start) / iters / len(calls), "wall"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_all()
    torch.cuda.current_stream().wait_stream(side)
    replay, how = run_all, "eager"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        replay, how = graph.replay, "graph"
    except RuntimeError as e:  # keep the row: an eager figure is still a figure
        print(f"graph capture failed ({e}); timing eager launches", flush=True)
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters / len(calls), how


def copies_for(weight_bytes: int, plan: Plan) -> int:
    """How many copies of a weight make the timed sequence overflow L2."""
    return max(1, -(-plan.rotate_bytes // weight_bytes))


def attempt(errors: list[str], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None with the failure recorded in ``errors`` (and its traceback printed):
    one failing row must not cost the others on a GPU lent for minutes."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
        traceback.print_exc()
        errors.append(f"{what}: {type(e).__name__}: {e}")
        return None


def w4a16_copies(k: int, n: int, plan: Plan) -> list[LinearBase]:
    return [w4a16_layer(k, n, plan.device) for _ in range(copies_for(n * k // 2, plan))]


def fp8_copies(dense: torch.Tensor, plan: Plan) -> list[LinearBase]:
    return [fp8_layer(dense) for _ in range(copies_for(dense.numel(), plan))]


def time_layers(layers: list[LinearBase], x: torch.Tensor, plan: Plan) -> tuple[float, str]:
    return time_calls([functools.partial(layer, x) for layer in layers], plan.device, plan.iters)


def gemm_tables(plan: Plan, bandwidth: float, errors: list[str]) -> tuple[list[dict], list[dict]]:
    w4_rows, fp8_rows = [], []
    for k, n in plan.shapes:
        gen = torch.Generator(plan.device).manual_seed(1)
        dense = (torch.randn(n, k, generator=gen, device=plan.device) * 0.02).to(torch.bfloat16)
        denses = [dense] + [dense.clone() for _ in range(copies_for(2 * n * k, plan) - 1)]
        w4s = attempt(errors, f"W4A16 layer {k}x{n}", w4a16_copies, k, n, plan)
        fp8s = attempt(errors, f"FP8 layer {k}x{n}", fp8_copies, dense, plan)
        for m in sorted(set(plan.w4a16_ms) | set(plan.fp8_ms)):
            x = torch.randn(m, k, generator=gen, device=plan.device).to(torch.bfloat16)
            bf16_s, how = time_calls([functools.partial(torch.matmul, x, w.t()) for w in denses],
                                     plan.device, plan.iters)
            common = dict(k=k, n=n, m=m, bf16_us=bf16_s * 1e6, bf16_timing=how)
            if m in plan.w4a16_ms and w4s:
                timed = attempt(errors, f"W4A16 GEMM {k}x{n} M={m}", time_layers, w4s, x, plan)
                if timed:
                    achieved = w4a16_bytes(m, k, n) / timed[0]
                    w4_rows.append(dict(common, us=timed[0] * 1e6, gb_s=achieved / 1e9,
                                        bandwidth_frac=achieved / bandwidth,
                                        speedup=bf16_s / timed[0], timing=timed[1],
                                        target=m == 1 and (k, n) in plan.large))
                    print(w4_rows[-1], flush=True)
            if m in plan.fp8_ms and fp8s:
                timed = attempt(errors, f"FP8 GEMM {k}x{n} M={m}", time_layers, fp8s, x, plan)
                if timed:
                    fp8_rows.append(dict(common, us=timed[0] * 1e6,
                                         tflops=2 * m * n * k / timed[0] / 1e12,
                                         speedup=bf16_s / timed[0], timing=timed[1],
                                         target=m >= FP8_TARGET_MIN_M))
                    print(fp8_rows[-1], flush=True)
        del w4s, fp8s, denses, dense
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return w4_rows, fp8_rows


# ---- decode -----------------------------------------------------------------------------------

def decode_rows(plan: Plan, name: str, path: pathlib.Path, extra: dict[str, Any]) -> list[dict]:
    """One configuration's rows: tok/s at each batch, with the engine's defaults (CUDA graphs
    on CUDA)."""
    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=max(plan.decode_batches),
              max_model_len=plan.prompt_len + 2 * plan.decode_steps + 64,
              kv_cache_memory_bytes=plan.kv_cache_bytes, **extra)
    rows = []
    for batch in plan.decode_batches:
        step, _ = decode_step_time(llm, batch, plan.prompt_len, plan.decode_steps)
        rows.append(dict(config=name, batch=batch, step_ms=step * 1e3, tok_s=batch / step))
        print(rows[-1], flush=True)
    return rows


def write_w4a16(base: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """The GPTQ g128 checkpoint of ``base``, written by quantized_model under ``workdir``."""
    start = time.perf_counter()
    path = workdir / "w4a16"
    write_quantized(base, path, workdir / "w4a16-twin", "gptq", W4A16, bits=4,
                    group_size=GROUP, sym=True)
    print(f"wrote the W4A16 checkpoint in {time.perf_counter() - start:.0f}s", flush=True)
    return path


def decode_table(plan: Plan, base: pathlib.Path, workdir: pathlib.Path,
                 errors: list[str]) -> list[dict]:
    w4_path = attempt(errors, "writing the W4A16 checkpoint", write_w4a16, base, workdir)
    rows = []
    for name, extra in DECODE_CONFIGS.items():
        path = w4_path if name == "w4a16" else base
        if path is None:
            continue
        rows += attempt(errors, f"decode {name}", decode_rows, plan, name, path, extra) or []
        gc.collect()  # the next engine sizes its memory from what this one frees
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_ratio(rows: list[dict], config: str, batch: int) -> Optional[float]:
    """tok/s of ``config`` over bf16's at ``batch`` (None when either is missing)."""
    rate = {(r["config"], r["batch"]): r["tok_s"] for r in rows}
    if (config, batch) not in rate or ("bf16", batch) not in rate:
        return None
    return rate[config, batch] / rate["bf16", batch]


# ---- output -----------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def markdown(card: str, bandwidth: float, w4: list[dict], fp8: list[dict],
             decode: Optional[list[dict]], errors: list[str]) -> str:
    lines = [f"## Quantized paths, {card}, {datetime.date.today().isoformat()}", "",
             f"Measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write).", "",
             f"W4A16 (GPTQ g{GROUP}) GEMM vs bf16 `torch.matmul`; bytes = packed weight + scales "
             f"+ zeros + activations + output; each call reads its weight from HBM (copies cycled "
             f"past L2). Target: >= {W4A16_BANDWIDTH_TARGET:.0%} of the "
             "copy bandwidth at M=1 on the large shapes.", "",
             "| K x N | M | W4A16 us | bf16 us | GB/s | % of bandwidth | vs bf16 | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in w4:
        target = (f"{_verdict(r['bandwidth_frac'] >= W4A16_BANDWIDTH_TARGET)} "
                  f">= {W4A16_BANDWIDTH_TARGET:.0%}" if r["target"] else "")
        lines.append(f"| {r['k']}x{r['n']} | {r['m']} | {r['us']:.1f} | {r['bf16_us']:.1f} | "
                     f"{r['gb_s']:.0f} | {100 * r['bandwidth_frac']:.0f}% | "
                     f"{r['speedup']:.2f}x | {target} |")
    lines += ["", "FP8 W8A8 (online FP8: per-channel weights, dynamic per-token activations, "
                  f"the linear method's own path) vs bf16. Target: >= {FP8_SPEEDUP_TARGET}x at "
                  f"M >= {FP8_TARGET_MIN_M}.", "",
              "| K x N | M | FP8 us | bf16 us | FP8 TFLOP/s | vs bf16 | target |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in fp8:
        target = (f"{_verdict(r['speedup'] >= FP8_SPEEDUP_TARGET)} >= {FP8_SPEEDUP_TARGET}x"
                  if r["target"] else "")
        lines.append(f"| {r['k']}x{r['n']} | {r['m']} | {r['us']:.1f} | {r['bf16_us']:.1f} | "
                     f"{r['tflops']:.1f} | {r['speedup']:.2f}x | {target} |")
    if decode:
        lines += ["", "Decode tok/s (engine defaults: CUDA graphs on CUDA). Target: W4A16 "
                      f"batch-1 >= {DECODE_W4A16_TARGET}x bf16.", "",
                  "| config | batch | step ms | tok/s | vs bf16 | target |",
                  "| --- | --- | --- | --- | --- | --- |"]
        first_batch = min(r["batch"] for r in decode)
        for r in decode:
            ratio = decode_ratio(decode, r["config"], r["batch"])
            target = ""
            if r["config"] == "w4a16" and r["batch"] == first_batch and ratio is not None:
                target = f"{_verdict(ratio >= DECODE_W4A16_TARGET)} >= {DECODE_W4A16_TARGET}x"
            lines.append(f"| {r['config']} | {r['batch']} | {r['step_ms']:.2f} | "
                         f"{r['tok_s']:.0f} | {ratio:.2f}x | {target} |"
                         if ratio is not None else
                         f"| {r['config']} | {r['batch']} | {r['step_ms']:.2f} | "
                         f"{r['tok_s']:.0f} | | |")
    if errors:
        lines += ["", "Failed (rows left out):"] + [f"- {e.splitlines()[0]}" for e in errors]
    return "\n".join(lines) + "\n"


def write_outputs(args: argparse.Namespace, card: str, bandwidth: float, w4: list[dict],
                  fp8: list[dict], decode: Optional[list[dict]], errors: list[str],
                  final: bool) -> None:
    """The JSON (rewritten after each table, so a run stopped by its time limit keeps what it
    measured) and, once at the end, the markdown table."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, bandwidth=bandwidth, smoke=args.smoke, w4a16_gemm=w4,
                           fp8_gemm=fp8, decode=decode, errors=errors, complete=final), f, indent=2)
    table = markdown(card, bandwidth, w4, fp8, decode, errors)
    print(table, flush=True)
    if final and args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="append the tables to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and model on the CPU: checks the script, not the GPU")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --smoke to check the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (smoke)"
    bandwidth = measure_copy_bandwidth(plan.device, plan.copy_bytes)
    errors: list[str] = []
    w4, fp8 = gemm_tables(plan, bandwidth, errors)
    decode = None
    if not args.skip_decode:
        write_outputs(args, card, bandwidth, w4, fp8, None, errors, final=False)
        with tempfile.TemporaryDirectory(prefix="gpu-quant-bench-") as tmp:
            workdir = pathlib.Path(tmp)
            if args.smoke:  # hidden and intermediate sizes the g128 groups divide
                base = build_preset(workdir / "dense", "tiny", hidden_size=128,
                                    intermediate_size=256, torch_dtype="bfloat16")
            else:
                base = model_dir("gpu-1b")
            decode = decode_table(plan, base, workdir, errors)
    write_outputs(args, card, bandwidth, w4, fp8, decode, errors, final=True)
    if errors:
        sys.exit(f"{len(errors)} measurement(s) failed; the tables hold the others")


if __name__ == "__main__":
    main()
