"""Serving benchmark: tritonserver + pagedserve against the in-process engine, same workload.

    .venv/bin/python benchmarks/serving.py [--workload cpu-small] [--concurrency 16]

Runs the workload at the same concurrency through ``AsyncLLMEngine`` in this process and
through a tritonserver started with ``pagedserve serve`` (an async gRPC streaming client, one
stream per request, prompts sent as ``input_ids``), alternating the two for ``--repeat``
rounds so that both see the same machine load (only one of them is busy at a time). Both use
the same engine arguments (one model.json). Reports output-token throughput, TTFT and
inter-token latency percentiles over all rounds, and the served/in-process ratio
(target: >= 85%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RequestTiming:
    """One request as the client saw it."""

    start: float
    first: Optional[float] = None
    end: Optional[float] = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # one per token after the first

    def output(self, now: float, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        if self.first is None:
            self.first = now
            self.gaps.extend([0.0] * (new_tokens - 1))
        else:
            self.gaps.extend([(now - self.end) / new_tokens] * new_tokens)
        self.tokens += new_tokens
        self.end = now


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(name: str, timings: list[RequestTiming], wall: float) -> dict[str, Any]:
    tokens = sum(t.tokens for t in timings)
    return {
        "mode": name,
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_ms": {k: v * 1e3 for k, v in _percentiles(
            [t.first - t.start for t in timings if t.first is not None]).items()},
        "itl_ms": {k: v * 1e3 for k, v in _percentiles(
            [g for t in timings for g in t.gaps]).items()},
    }


async def _bounded(concurrency: int, jobs: list) -> list:
    semaphore = asyncio.Semaphore(concurrency)

    async def run(job):
        async with semaphore:
            return await job()

    return await asyncio.gather(*(run(j) for j in jobs))


# ---- in-process ----------------------------------------------------------------------------

class InProcess:
    """Owns the in-process AsyncLLMEngine (used from the benchmark's one event loop)."""

    def __init__(self, engine_json: Path) -> None:
        from pagedserve import EngineArgs
        from pagedserve.engine.async_engine import AsyncLLMEngine

        self.engine = AsyncLLMEngine(EngineArgs.from_json_file(engine_json))
        self._ids = iter(range(10**9))

    def _job(self, req):
        from pagedserve import RequestOutputKind, SamplingParams

        async def go() -> RequestTiming:
            params = SamplingParams(max_tokens=req.output_len, ignore_eos=True,
                                    temperature=0.0, output_kind=RequestOutputKind.DELTA)
            timing = RequestTiming(time.perf_counter())
            prompt = {"prompt_token_ids": list(req.prompt_token_ids)}
            async for out in self.engine.generate(prompt, params, f"bench-{next(self._ids)}"):
                out.outputs[0].text  # noqa: B018  (what a server would read)
                timing.output(time.perf_counter(), len(out.outputs[0].token_ids))
            return timing
        return go

    async def run(self, requests: list, concurrency: int) -> list[RequestTiming]:
        return await _bounded(concurrency, [self._job(r) for r in requests])

    def close(self) -> None:
        self.engine.shutdown()


# ---- served --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A tritonserver started by ``start_server``: its process and ports."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int


def start_server(repository: Path, log_path: Path) -> RunningServer:
    import requests as http

    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "serve",
             "--model-repository", str(repository),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--metrics-port", str(metrics_port), "--allow-gpu-metrics", "false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited; log:\n{log_path.read_text()[-5000:]}")
        try:
            if http.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).ok:
                return RunningServer(process, http_port, grpc_port, metrics_port)
        except http.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"tritonserver not ready; log:\n{log_path.read_text()[-5000:]}")


class Served:
    """Owns the async gRPC client of the served runs: one stream per request."""

    def __init__(self, grpc_port: int) -> None:
        import tritonclient.grpc.aio as aioclient
        from tritonclient.grpc import InferRequestedOutput

        self.client = aioclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        self.outputs = [InferRequestedOutput("text_output"), InferRequestedOutput("output_ids")]

    @staticmethod
    def _inputs(req) -> list:
        import numpy as np
        from tritonclient.grpc import InferInput

        ids = np.array(req.prompt_token_ids, dtype=np.int32)
        params = json.dumps({"max_tokens": req.output_len, "ignore_eos": True,
                             "temperature": 0.0})
        items = [("input_ids", ids, "INT32"), ("stream", np.array([True]), "BOOL"),
                 ("sampling_parameters", np.array([params], dtype=np.object_), "BYTES")]
        tensors = []
        for name, array, dtype in items:
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def _job(self, req):
        async def go() -> RequestTiming:
            async def one():
                yield {"model_name": "llm", "inputs": self._inputs(req), "outputs": self.outputs}

            timing = RequestTiming(time.perf_counter())
            async for result, error in self.client.stream_infer(one()):
                if error is not None:
                    raise RuntimeError(error)
                result.as_numpy("text_output")  # a real client reads the text
                timing.output(time.perf_counter(), len(result.as_numpy("output_ids")))
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            return timing
        return go

    async def run(self, requests: list, concurrency: int) -> list[RequestTiming]:
        return await _bounded(concurrency, [self._job(r) for r in requests])

    async def close(self) -> None:
        await self.client.close()


def _process_tree_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by ``root`` and its descendants,
    by process name: tritonserver, and the Python backend's stub (which runs the engine)."""
    parent: dict[int, int] = {}
    ticks: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 1:].split()
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        ticks[pid] = (name, int(fields[11]) + int(fields[12]))
    totals: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in ticks:
            name, used = ticks[pid]
            # The kernel keeps 15 characters of a name: "triton_python_b(ackend_stub)".
            name = "stub" if name.startswith("triton_python") else (
                name if name == "tritonserver" else "other")
            totals[name] = totals.get(name, 0.0) + used / tick
        stack.extend(child for child, ppid in parent.items() if ppid == pid)
    return totals


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def compare(
    engine_json: Path, grpc_port: int, server_pid: int, requests: list, concurrency: int,
    repeat: int,
) -> list[dict]:
    """Alternates in-process and served runs, so that both see the same machine load."""
    in_process, served = InProcess(engine_json), Served(grpc_port)
    timings: dict[str, list[RequestTiming]] = {"in-process": [], "served (gRPC stream)": []}
    walls = {name: 0.0 for name in timings}
    # CPU seconds per mode: this process (the in-process engine, or the gRPC client), and the
    # server's processes (idle during in-process rounds).
    cpu: dict[str, dict[str, float]] = {name: {"this process": 0.0} for name in timings}
    try:
        # One full pass each first: allocator and cache warm-up made the first timed round slow.
        await in_process.run(requests, concurrency)
        await served.run(requests, concurrency)
        for round_ in range(repeat):
            for name, runner in (("in-process", in_process), ("served (gRPC stream)", served)):
                start = time.perf_counter()
                own, server = _own_cpu_s(), _process_tree_cpu_s(server_pid)
                timings[name] += await runner.run(requests, concurrency)
                wall = time.perf_counter() - start
                walls[name] += wall
                cpu[name]["this process"] += _own_cpu_s() - own
                for proc, used in _process_tree_cpu_s(server_pid).items():
                    cpu[name][proc] = cpu[name].get(proc, 0.0) + used - server.get(proc, 0.0)
                tokens = sum(r.output_len for r in requests)
                print(f"  round {round_ + 1} {name}: {tokens / wall:.1f} tok/s", flush=True)
    finally:
        in_process.close()
        await served.close()
    results = [summarize(name, timings[name], walls[name]) for name in timings]
    for r in results:
        r["cpu_s"] = cpu[r["mode"]]
    return results


# ---- main ----------------------------------------------------------------------------------

def _print(results: list[dict]) -> None:
    print(f"{'mode':<22}{'tok/s':>9}{'TTFT p50/p90/p99 ms':>26}{'ITL p50/p90/p99 ms':>26}")
    for r in results:
        ttft = "/".join(f"{r['ttft_ms'][k]:.1f}" for k in ("p50", "p90", "p99"))
        itl = "/".join(f"{r['itl_ms'][k]:.1f}" for k in ("p50", "p90", "p99"))
        print(f"{r['mode']:<22}{r['throughput_tok_s']:>9.1f}{ttft:>26}{itl:>26}")
    print("CPU seconds per 1000 output tokens (this process: the in-process engine or the gRPC "
          "client; stub: the served engine):")
    for r in results:
        per_k = {k: 1e3 * v / r["output_tokens"] for k, v in r["cpu_s"].items()}
        wall_k = 1e3 * r["wall_s"] / r["output_tokens"]
        print(f"  {r['mode']:<22} " + ", ".join(f"{k} {v:.2f}" for k, v in per_k.items()
                                                if v >= 0.005)
              + f"; wall {wall_k:.2f}")


def main(argv: Optional[list[str]] = None) -> int:
    from pagedserve.devtools.workload import WORKLOADS, make_requests, model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="cpu-small", choices=sorted(WORKLOADS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help='extra model.json entry, e.g. --engine-arg max_num_seqs=32')
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--no-metrics", action="store_true",
                        help="serve with REPORT_CUSTOM_METRICS=false (to see what metrics cost)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    spec = WORKLOADS[args.workload]
    checkpoint = model_dir(spec.preset)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    requests = make_requests(spec, vocab)[: args.num_requests]
    engine_args: dict[str, Any] = {"model": str(checkpoint)}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        engine_args[key] = json.loads(value)

    work = Path(tempfile.mkdtemp(prefix="pagedserve-bench-"))
    try:
        repository = work / "model_repository"
        shutil.copytree(REPO_ROOT / "model_repository" / "llm", repository / "llm",
                        ignore=shutil.ignore_patterns("default_model", "draft_model",
                                                      "__pycache__"))
        engine_json = repository / "llm" / "1" / "model.json"
        engine_json.write_text(json.dumps(engine_args))
        if args.no_metrics:
            config = repository / "llm" / "config.pbtxt"
            text = config.read_text()
            on = 'key: "REPORT_CUSTOM_METRICS"\n  value: { string_value: "true" }'
            assert on in text, "llm/config.pbtxt no longer sets REPORT_CUSTOM_METRICS"
            config.write_text(text.replace(on, on.replace('"true"', '"false"')))
        print(f"workload {args.workload}: {len(requests)} requests, "
              f"{sum(r.output_len for r in requests)} output tokens, "
              f"concurrency {args.concurrency}, engine {engine_args}", flush=True)

        server = start_server(repository, work / "tritonserver.log")
        try:
            results = asyncio.run(
                compare(engine_json, server.grpc_port, server.process.pid, requests,
                        args.concurrency, args.repeat)
            )
        finally:
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=60)
        _print(results)
        ratio = results[1]["throughput_tok_s"] / results[0]["throughput_tok_s"]
        print(f"served / in-process throughput: {ratio:.1%} (target >= 85%)")
        if args.json:
            args.json.write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
