"""What tensor parallelism adds to an engine step on the host (issue 12): rank 0 hands the
step's SchedulerOutput, with its sampled tokens of the step before, to the other ranks (the mp
executor's control channel: one broadcast). No model runs: this is the null-model style of
measurement, the engine's own cost per step, for decode steps of N running requests (each
step's diff: N scheduled request ids, a new block for every 16th).

rank 0's send returns at once, and the message travels while rank 0 starts its forward, so its
cost shows at the model's first collective, which the workers join only once they have the
message. Each step therefore times that collective (an all-reduce of one token's hidden state)
with and without the message before it, interleaved; what the message adds is the difference.
With ``--async-scheduling`` the message carries no tokens (rank 0 sends the next step before it
has them) and each step instead broadcasts its tokens, one per request, from rank 0 to the
workers (SampledTokenShare), timed with the message.

    python benchmarks/tp_overhead.py [--tp 2] [--running 1 32 256] [--steps 300]
                                     [--async-scheduling]

Prints the median and p90 milliseconds per step, and judges the issue's target: at most 0.5 ms
added at 256 running requests (for the default, synchronous steps: async scheduling is off on
the CPU, and on GPUs the tokens' broadcast is NCCL's, on the device).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedserve.core.scheduler_output import SchedulerOutput
from pagedserve.executor import control
from pagedserve.executor.multi_rank import free_port
from pagedserve.executor.rank import RankZeroTokens, join_ranks

# The all-reduce standing for the model's first collective: one token's hidden state (8B).
HIDDEN_SIZE = 4096
TARGET_MS = 0.5
TARGET_RUNNING = 256


def decode_step(num_running: int, step: int) -> SchedulerOutput:
    """A decode step of ``num_running`` requests, as the scheduler sends it: every request's
    id (as long as vLLM's: "cmpl-" and 32 hex digits) with one token, and a new block for the
    requests crossing a block boundary."""
    ids = [f"cmpl-{i:032x}" for i in range(num_running)]
    return SchedulerOutput(
        scheduled_new_reqs=[],
        new_block_ids={rid: [1000 + step] for i, rid in enumerate(ids) if (i + step) % 16 == 0},
        num_scheduled_tokens=dict.fromkeys(ids, 1),
        total_num_scheduled_tokens=num_running,
    )


def _message(num_running: int, step: int,
             async_scheduling: bool) -> tuple[str, object]:
    """A decode step's command: EXECUTE with its diff and rank 0's tokens of the step before;
    with async scheduling LAUNCH with the diff alone."""
    if async_scheduling:
        return control.LAUNCH, decode_step(num_running, step)
    return control.EXECUTE, (decode_step(num_running, step),
                             RankZeroTokens(np.zeros((num_running, 1), np.int64)))


def _rank(rank: int, world: int, port: int, running: list[int], steps: int,
          async_scheduling: bool, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    tp = join_ranks(world, rank, f"tcp://127.0.0.1:{port}", collective_timeout_s=60)
    channel = control.ControlChannel(timeout_s=60)
    hidden = torch.zeros(HIDDEN_SIZE)
    for n in running:
        alone_ms, with_ms, send_ms = [], [], []
        size = len(pickle.dumps(_message(n, 1, async_scheduling), pickle.HIGHEST_PROTOCOL))
        tokens = torch.zeros(n, 1, dtype=torch.int64)
        for step in range(2 * steps):
            with_message = step % 2 == 1
            if rank == 0:
                message = _message(n, step, async_scheduling) if with_message else None
                t0 = time.perf_counter()
                if with_message:
                    channel.send(*message)
                t1 = time.perf_counter()
            elif with_message:
                channel.receive()
            tp.all_reduce(hidden)
            if with_message and async_scheduling:
                tp.broadcast(tokens)
            if rank == 0:
                t2 = time.perf_counter()
                (with_ms if with_message else alone_ms).append((t2 - t0) * 1e3)
                if with_message:
                    send_ms.append((t1 - t0) * 1e3)
        if rank == 0:
            results.put((n, size, send_ms, alone_ms, with_ms))
    if rank == 0:
        channel.send(control.STOP)
        channel.flush()
    else:
        channel.receive()
    dist.destroy_process_group()


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--running", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--async-scheduling", action="store_true",
                        help="steps as async scheduling runs them: tokens broadcast in the step")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.tp, port, args.running, args.steps,
                                             args.async_scheduling, results))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=600) for _ in args.running]
    for p in procs:
        p.join(60)
    mode = ("async scheduling: the message without tokens, their broadcast in the step"
            if args.async_scheduling else "the message with the tokens of the step before")
    print(f"tp {args.tp}, gloo on the CPU, {args.steps} decode steps each, ms per step "
          f"(median / p90); the first collective stands for the model's; {mode}:")
    print("| running | message bytes | send (rank 0) | first collective alone | "
          f"message + first collective{' + tokens' if args.async_scheduling else ''} | added |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    verdict = 0
    for n, size, send_ms, alone_ms, with_ms in rows:
        added = statistics.median(with_ms) - statistics.median(alone_ms)
        print(f"| {n} | {size} | {statistics.median(send_ms):.3f} / {_p(send_ms, 0.9):.3f} | "
              f"{statistics.median(alone_ms):.3f} / {_p(alone_ms, 0.9):.3f} | "
              f"{statistics.median(with_ms):.3f} / {_p(with_ms, 0.9):.3f} | {added:.3f} |")
        if n == TARGET_RUNNING and not args.async_scheduling:
            met = added <= TARGET_MS
            print(f"- target: <= {TARGET_MS} ms added at {n} running: "
                  f"{'met' if met else 'MISSED'} ({added:.3f} ms)")
            verdict = 0 if met else 1
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
