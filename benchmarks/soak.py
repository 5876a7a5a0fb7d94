"""Soak benchmark: is the llm stub's memory bounded under a long mixed load?

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--concurrency 32]

Starts tritonserver with the shipped model repository (``pagedserve serve``, as
``benchmarks/serving.py`` does; the default model, or ``--model DIR``) and sends a seeded mix of
requests to the ``llm`` model, ``--concurrency`` at a time: gRPC streams, non-streamed
requests over gRPC and over HTTP ``generate``, streams the client cancels after a few
responses, and bad requests (each must get INVALID_ARG). Sampling parameters vary (greedy and
random, top-k/top-p, seeds, logprobs, stop strings, ``n`` of 2). It prints the llm stub's RSS
after warm-up, at every tenth of the run and at the end, the KV blocks in use once the load
is gone (must be 0), errors by request kind, and the RSS growth over the last half of the
run: the highest RSS sampled (every 0.25 s) after the midpoint against the highest between
warm-up and the midpoint (target: within 1%).
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import REPO_ROOT, start_server  # noqa: E402  (the benchmarks' shared launcher)

KINDS = (  # (kind, share of the requests)
    ("stream", 0.45),  # gRPC stream, stream=true
    ("final", 0.15),  # gRPC stream, stream=false: one response
    ("http", 0.10),  # HTTP generate: one response
    ("cancel", 0.15),  # gRPC stream cancelled by the client after 1-3 responses
    ("bad", 0.15),  # rejected input, over gRPC or HTTP
)
_TEXT = (
    "the quick brown fox jumps over a lazy dog while an old fisherman sails out to sea "
    "every morning and comes back with fish ; numbers like 17 23 391 and 3.14159 mix with "
    "words such as café naïve Ελληνικά 中文 日本語 and emoji 🙂 in the prompts"
)
WORDS = tuple(_TEXT.split())
RSS_TARGET = 0.01
WARMUP_SHARE = 0.05


@dataclass
class Outcome:
    """What one request ended with, as the client saw it."""

    kind: str
    error: Optional[str] = None  # the error's code (INVALID_ARG, CANCELLED, ...), None if ok
    detail: str = ""


@dataclass
class Progress:
    """Completed requests and the (completed, RSS bytes) samples taken along the way."""

    done: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)


# ---- the llm stub's memory -----------------------------------------------------------------

def find_llm_stub(server_pid: int, model: str = "llm") -> int:
    """The pid of the Python backend stub that serves ``model`` (instance ``<model>_0_0``)."""
    instance = f"{model}_0_0"
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 1:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    stack = [server_pid]
    while stack:
        pid = stack.pop()
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if instance.encode() in args and b"stub" in args[0]:
            return pid
        stack.extend(children.get(pid, []))
    raise RuntimeError(f"no Python backend stub for {instance} under pid {server_pid}")


def memory_status(pid: int) -> dict[str, int]:
    """The process's resident memory in bytes: VmRSS and its RssAnon/RssFile/RssShmem parts."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def rss_bytes(pid: int) -> int:
    return memory_status(pid)["VmRSS"]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- the request mix -----------------------------------------------------------------------

def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))


def _sampling(rng: random.Random, n_allowed: bool = True) -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": rng.randint(1, 48)}
    if rng.random() < 0.5:
        params["temperature"] = 0.0
    else:
        params["temperature"] = round(rng.uniform(0.3, 1.2), 2)
        if rng.random() < 0.4:
            params["top_p"] = round(rng.uniform(0.5, 0.95), 2)
        if rng.random() < 0.4:
            params["top_k"] = rng.randint(1, 50)
        if rng.random() < 0.3:
            params["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.5:
        params["ignore_eos"] = True
    if rng.random() < 0.15:
        params["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.15:
        params["stop"] = [rng.choice(WORDS), rng.choice(WORDS) + " " + rng.choice(WORDS)]
    if n_allowed and rng.random() < 0.05:
        params["n"] = 2
    return params


def _bad(rng: random.Random) -> dict[str, Any]:
    """One rejected request: its gRPC inputs (as JSON-able values) or HTTP body."""
    prompt = _prompt(rng)
    choices = [
        {"text_input": prompt, "sampling_parameters": "{not json"},
        {"text_input": prompt, "sampling_parameters": json.dumps({"no_such_field": 1})},
        {"text_input": prompt, "sampling_parameters": json.dumps({"temperature": -1})},
        {"text_input": prompt, "sampling_parameters": json.dumps({"top_p": 2.0})},
        {"text_input": prompt, "sampling_parameters": json.dumps({"max_tokens": 0})},
        {"sampling_parameters": json.dumps({"max_tokens": 4})},  # no prompt
        {"input_ids": [10**7, 5, 6], "sampling_parameters": json.dumps({"max_tokens": 4})},
        {"text_input": prompt + " word" * 5000},  # longer than max_model_len
        {"text_input": prompt, "stream": True, "exclude_input_in_output": False},
    ]
    return rng.choice(choices)


@dataclass
class Plan:
    """One request of the mix, decided up front from the seed."""

    kind: str
    inputs: dict[str, Any]
    cancel_after: int = 0
    over_http: bool = False


def make_plan(num: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    names, weights = zip(*KINDS)
    plans = []
    for kind in rng.choices(names, weights, k=num):
        if kind == "bad":
            plans.append(Plan(kind, _bad(rng), over_http=rng.random() < 0.3))
            continue
        params = _sampling(rng)
        inputs: dict[str, Any] = {"text_input": _prompt(rng)}
        if kind in ("stream", "cancel"):
            inputs["stream"] = True
            if kind == "cancel":
                params["max_tokens"], params["ignore_eos"] = 400, True
        else:
            inputs["exclude_input_in_output"] = rng.random() < 0.5
        inputs["sampling_parameters"] = json.dumps(params)
        plans.append(Plan(kind, inputs, cancel_after=rng.randint(1, 3),
                          over_http=kind == "http"))
    return plans


# ---- clients -------------------------------------------------------------------------------

def _grpc_inputs(values: dict[str, Any]) -> list:
    import numpy as np
    from tritonclient.grpc import InferInput

    tensors = []
    for name, value in values.items():
        if isinstance(value, bool):
            array, dtype = np.array([value], dtype=np.bool_), "BOOL"
        elif isinstance(value, list):
            array, dtype = np.array(value, dtype=np.int64).astype(np.int32), "INT32"
        else:
            array, dtype = np.array([value], dtype=np.object_), "BYTES"
        tensor = InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _grpc_error(error: Any) -> str:
    """A gRPC stream's error response carries a message but no status code."""
    return "CANCELLED" if "cancel" in str(error).lower() else "ERROR"


class Clients:
    """Owns the async gRPC client and the HTTP session the mix is sent through."""

    def __init__(self, grpc_port: int, http_port: int) -> None:
        import aiohttp
        import tritonclient.grpc.aio as aioclient

        self.grpc = aioclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        self.http = aiohttp.ClientSession(f"http://127.0.0.1:{http_port}")

    async def close(self) -> None:
        await self.grpc.close()
        await self.http.close()

    async def send(self, plan: Plan) -> Outcome:
        if plan.over_http:
            return await self._http(plan)
        return await self._grpc(plan)

    async def _grpc(self, plan: Plan) -> Outcome:
        async def one():
            yield {"model_name": "llm", "inputs": _grpc_inputs(plan.inputs)}

        responses = self.grpc.stream_infer(one())
        received = 0
        try:
            async for result, error in responses:
                if error is not None:
                    return Outcome(plan.kind, _grpc_error(error), str(error)[:200])
                received += 1
                final = result.get_response().parameters["triton_final_response"].bool_param
                if final:
                    return Outcome(plan.kind)
                if plan.kind == "cancel" and received >= plan.cancel_after:
                    responses.cancel()
                    return Outcome(plan.kind, "CANCELLED", "cancelled by the client")
        except Exception as e:  # e.g. grpc.aio.AioRpcError
            return Outcome(plan.kind, _grpc_error(e), repr(e)[:200])
        return Outcome(plan.kind, "OTHER", "stream ended without a final response")

    async def _http(self, plan: Plan) -> Outcome:
        body = dict(plan.inputs)
        try:
            params = json.loads(body.get("sampling_parameters", "{}"))
        except json.JSONDecodeError:
            params = None
        # Top-level keys, as the generate extension's users send them, except lists (which
        # Triton does not take as request parameters) and n (one text per response).
        if isinstance(params, dict) and "stop" not in params and "n" not in params:
            body.pop("sampling_parameters", None)
            body.update(params)
        try:
            async with self.http.post("/v2/models/llm/generate", json=body) as response:
                text = await response.text()
                if response.status == 200:
                    return Outcome(plan.kind)
                code = {400: "INVALID_ARG", 499: "CANCELLED", 503: "UNAVAILABLE"}.get(
                    response.status, "INTERNAL" if response.status == 500 else "OTHER")
                return Outcome(plan.kind, code, text[:200])
        except Exception as e:
            return Outcome(plan.kind, "OTHER", repr(e)[:200])


# ---- the run -------------------------------------------------------------------------------

async def _sample_rss(pid: int, progress: Progress, period_s: float) -> None:
    while True:
        progress.samples.append((progress.done, rss_bytes(pid)))
        await asyncio.sleep(period_s)


async def run_mix(
    plans: list[Plan], clients: Clients, concurrency: int, stub_pid: int, progress: Progress
) -> list[Outcome]:
    queue: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    outcomes: list[Outcome] = []
    step = max(1, len(plans) // 20)

    async def worker() -> None:
        while not queue.empty():
            plan = queue.get_nowait()
            outcomes.append(await clients.send(plan))
            progress.done += 1
            if progress.done % step == 0:
                print(f"  {progress.done:>6} requests  stub RSS {_mib(rss_bytes(stub_pid))}",
                      flush=True)

    sampler = asyncio.ensure_future(_sample_rss(stub_pid, progress, 0.25))
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        sampler.cancel()
    progress.samples.append((progress.done, rss_bytes(stub_pid)))
    return outcomes


def _rss_at(samples: list[tuple[int, int]], done: int) -> int:
    """The first RSS sample taken once ``done`` requests had completed."""
    return next(rss for count, rss in samples if count >= done)


async def _kv_blocks_in_use(metrics_port: int) -> tuple[int, int, Optional[float]]:
    """(blocks in use, blocks, usage) from the llm's metrics once nothing runs."""
    import aiohttp

    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
            usage = running = None
            blocks = 0
            for line in text.splitlines():
                if 'model="llm"' not in line:
                    continue
                if line.startswith("vllm:kv_cache_usage_perc{"):
                    usage = float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:num_requests_running{"):
                    running = float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:cache_config_info{"):
                    blocks = int(line.split('num_gpu_blocks="')[1].split('"')[0])
            if (running == 0 and usage == 0) or time.monotonic() > deadline:
                return round((usage or 0.0) * blocks), blocks, usage
            await asyncio.sleep(0.5)


def _report(
    plans: list[Plan], outcomes: list[Outcome], progress: Progress, idle_rss: dict[str, int],
    kv: tuple[int, int, Optional[float]], wall: float,
) -> bool:
    n = len(plans)
    samples = progress.samples
    warm = max(1, int(n * WARMUP_SHARE))
    print(f"\n{n} requests in {wall:.0f} s ({n / wall:.1f}/s)")
    print("llm stub RSS:")
    print(f"  after warm-up ({warm} requests): {_mib(_rss_at(samples, warm))}")
    for tenth in range(1, 11):
        count = n * tenth // 10
        print(f"  at {count:>6} requests: {_mib(_rss_at(samples, count))}")
    print(f"  at the end, idle: {_mib(idle_rss['VmRSS'])} (anonymous "
          f"{_mib(idle_rss['RssAnon'])}, files {_mib(idle_rss['RssFile'])}, shared memory "
          f"{_mib(idle_rss['RssShmem'])})")
    # High-water marks, so that a sample taken while a large step's activations are alive
    # (they come and go with the step) is compared with the like, not with a quiet moment.
    first_half = max(rss for count, rss in samples if warm <= count < n // 2)
    last_half = max(rss for count, rss in samples if count >= n // 2)
    growth = (last_half - first_half) / first_half
    print(f"  highest RSS between warm-up and the midpoint: {_mib(first_half)}; after the "
          f"midpoint: {_mib(last_half)}")
    print(f"  growth after warm-up: {_mib(last_half - _rss_at(samples, warm))}; over the last "
          f"half (highest after the midpoint vs highest before it): "
          f"{_mib(last_half - first_half)} = {growth:+.2%} (target {RSS_TARGET:.0%})")
    in_use, blocks, usage = kv
    print(f"KV blocks in use at the end: {in_use} of {blocks} (vllm:kv_cache_usage_perc {usage})")

    sent = Counter(p.kind for p in plans)
    errors: dict[str, Counter] = {kind: Counter() for kind, _ in KINDS}
    details: dict[tuple[str, str], str] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.kind][o.error] += 1
            details.setdefault((o.kind, o.error), o.detail)
    print("errors by kind (HTTP: the status code's name; a gRPC stream's error has no code: "
          "ERROR, or CANCELLED):")
    print(f"  {'kind':<8}{'sent':>7}{'ok':>7}  errors")
    ok = True
    for kind, _ in KINDS:
        errs = errors[kind]
        listed = ", ".join(f"{code} {count}" for code, count in errs.most_common()) or "-"
        print(f"  {kind:<8}{sent[kind]:>7}{sent[kind] - sum(errs.values()):>7}  {listed}")
        allowed = {"bad": {"INVALID_ARG", "ERROR"}, "cancel": {"CANCELLED"}}.get(kind, set())
        unexpected = set(errs) - allowed
        if kind == "bad" and sum(errs.values()) != sent[kind]:
            unexpected.add("accepted")
        for code in sorted(unexpected):
            ok = False
            print(f"    unexpected {code}: {details.get((kind, code), '')}")
    checks = [("RSS growth over the last half", growth <= RSS_TARGET),
              ("no KV block in use", in_use == 0 and usage == 0), ("errors as expected", ok)]
    for name, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return all(passed for _, passed in checks)


async def soak(args: argparse.Namespace, server: Any) -> bool:
    stub = find_llm_stub(server.process.pid)
    plans = make_plan(args.requests, args.seed)
    clients = Clients(server.grpc_port, server.http_port)
    progress = Progress()
    start_rss = memory_status(stub)
    print(f"llm stub pid {stub}, RSS at start {_mib(start_rss['VmRSS'])} (anonymous "
          f"{_mib(start_rss['RssAnon'])}, shared memory {_mib(start_rss['RssShmem'])})",
          flush=True)
    start = time.monotonic()
    try:
        outcomes = await run_mix(plans, clients, args.concurrency, stub, progress)
    finally:
        await clients.close()
    wall = time.monotonic() - start
    kv = await _kv_blocks_in_use(server.metrics_port)
    idle_rss = memory_status(stub)
    if args.samples is not None:
        args.samples.write_text("".join(f"{done},{rss}\n" for done, rss in progress.samples))
    return _report(plans, outcomes, progress, idle_rss, kv, wall)


def _repository(dest: Path, model: Optional[Path], engine_args: list[str]) -> Path:
    """A copy of the shipped model repository (its committed default model replaced by
    ``model`` when given) with ``KEY=JSON`` entries added to llm/1/model.json."""
    shutil.copytree(REPO_ROOT / "model_repository", dest,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if model is not None:
        target = dest / "llm" / "1" / "default_model"
        shutil.rmtree(target)
        shutil.copytree(model, target)
    model_json = dest / "llm" / "1" / "model.json"
    values = json.loads(model_json.read_text())
    for item in engine_args:
        key, _, value = item.partition("=")
        values[key] = json.loads(value)
    model_json.write_text(json.dumps(values, indent=4))
    return dest


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to serve instead of the default model")
    parser.add_argument("--samples", type=Path, default=None,
                        help="write the RSS samples here (CSV: requests done, RSS bytes)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra llm/1/model.json entry, e.g. --engine-arg max_num_seqs=64")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pagedserve-soak-"))
    try:
        repository = _repository(work / "model_repository", args.model, args.engine_arg)
        print(f"soak: {args.requests} requests at concurrency {args.concurrency}, "
              f"shares {dict(KINDS)}, engine arguments "
              f"{(repository / 'llm' / '1' / 'model.json').read_text()}", flush=True)
        server = start_server(repository, work / "tritonserver.log")
        try:
            passed = asyncio.run(soak(args, server))
        finally:
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
