"""The mp executor's control channel between two gloo ranks: a message in one broadcast, one
larger than the buffer in two, a wait that runs out as a TimeoutError naming the command (and
the channel still usable after), and the minimum over ranks."""

from __future__ import annotations

import pickle
import time
import traceback

import torch.multiprocessing as mp

from pagedserve.executor import control
from pagedserve.executor.multi_rank import free_port
from pagedserve.executor.rank import join_ranks

SMALL = ("execute", {"req-1": 1, "req-2": 1})
LARGE = ("execute", list(range(40_000)))  # pickles to well over CAPACITY
LATE_S = 2.0  # how long the worker keeps the third message waiting


def _rank(rank: int, port: int, results: mp.Queue) -> None:
    try:
        join_ranks(2, rank, f"tcp://127.0.0.1:{port}", collective_timeout_s=30)
        channel = control.ControlChannel(timeout_s=30)
        if rank == 0:
            channel.send(*SMALL)
            channel.send(*LARGE)
            channel.send("late", None)
            try:
                channel.flush(timeout_s=0.3)
                results.put(("rank0", "no timeout"))
            except TimeoutError as e:
                results.put(("rank0", str(e)))
            channel.flush()  # the worker takes it after all
            results.put(("min", channel.min_over_ranks(7)))
        else:
            got = [channel.receive(), channel.receive()]
            time.sleep(LATE_S)
            got.append(channel.receive())
            channel.min_over_ranks(3)
            results.put(("rank1", got))
    except BaseException:
        results.put((f"error{rank}", traceback.format_exc()))


def test_messages_of_any_size_arrive_and_a_late_worker_times_the_wait_out():
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in range(3))
    for p in procs:
        p.join(30)
    assert not any(k.startswith("error") for k in got), got
    assert got["rank1"] == [SMALL, LARGE, ("late", None)]
    assert len(pickle.dumps(LARGE)) > control.CAPACITY
    assert "'late' command within 0.3 s" in got["rank0"]
    assert got["min"] == 3

