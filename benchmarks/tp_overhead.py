"""What tensor parallelism adds to an engine step on the host (issue 12): rank 0 hands the
step's SchedulerOutput to the other ranks (the mp executor's control channel) and, after
sampling, broadcasts its sampled tokens to them (RankZeroSampler). No model runs: this is the
null-model style of measurement, the engine's own cost per step, for decode steps of
N running requests (each step's diff: N scheduled request ids, a new block for every 16th).

    python benchmarks/tp_overhead.py [--tp 2] [--running 1 32 256] [--steps 300]

Prints the median and p90 milliseconds per step of each part and of both, and judges the
issue's target: at most 0.5 ms added at 256 running requests.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from pagedserve.core.scheduler_output import SchedulerOutput
from pagedserve.executor import control
from pagedserve.executor.rank import join_ranks

TARGET_MS = 0.5
TARGET_RUNNING = 256


def decode_step(num_running: int, step: int) -> SchedulerOutput:
    """A decode step of ``num_running`` requests, as the scheduler sends it: every request's
    id with one token, and a new block for the requests crossing a block boundary."""
    ids = [f"req-{i}" for i in range(num_running)]
    return SchedulerOutput(
        scheduled_new_reqs=[],
        new_block_ids={rid: [1000 + step] for i, rid in enumerate(ids) if (i + step) % 16 == 0},
        num_scheduled_tokens=dict.fromkeys(ids, 1),
        total_num_scheduled_tokens=num_running,
    )


def _rank(rank: int, world: int, port: int, running: list[int], steps: int,
          results: mp.Queue) -> None:
    torch.set_num_threads(1)
    tp = join_ranks(world, rank, f"tcp://127.0.0.1:{port}", collective_timeout_s=60)
    channel = control.ControlChannel(timeout_s=60)
    for n in running:
        tokens = torch.zeros(n, 1, dtype=torch.int64)
        send_ms, tokens_ms = [], []
        for step in range(steps):
            if rank == 0:
                sched = decode_step(n, step)
                t0 = time.perf_counter()
                channel.send(control.EXECUTE, sched)
                t1 = time.perf_counter()
            else:
                channel.receive()
                t1 = time.perf_counter()
            tp.broadcast(tokens)
            t2 = time.perf_counter()
            if rank == 0:
                send_ms.append((t1 - t0) * 1e3)
                tokens_ms.append((t2 - t1) * 1e3)
        if rank == 0:
            results.put((n, send_ms, tokens_ms))
    if rank == 0:
        channel.send(control.STOP)
    else:
        channel.receive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--running", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.tp, port, args.running, args.steps, results))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in args.running]
    for p in procs:
        p.join(60)
    print(f"tp {args.tp}, gloo on the CPU, {args.steps} decode steps each, ms per step "
          "(median / p90):")
    print("| running | send the step | broadcast the tokens | both |")
    print("| ---: | ---: | ---: | ---: |")
    verdict = 0
    for n, send_ms, tokens_ms in rows:
        both = [a + b for a, b in zip(send_ms, tokens_ms)]
        print(f"| {n} | {statistics.median(send_ms):.3f} / {_p(send_ms, 0.9):.3f} | "
              f"{statistics.median(tokens_ms):.3f} / {_p(tokens_ms, 0.9):.3f} | "
              f"{statistics.median(both):.3f} / {_p(both, 0.9):.3f} |")
        if n == TARGET_RUNNING:
            met = statistics.median(both) <= TARGET_MS
            print(f"- target: <= {TARGET_MS} ms added at {n} running: "
                  f"{'met' if met else 'MISSED'} ({statistics.median(both):.3f} ms)")
            verdict = 0 if met else 1
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
