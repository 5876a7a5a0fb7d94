"""Tensor parallelism over Triton: a model.json with ``tensor_parallel_size: 2`` loads (its
second rank a worker process the Python backend's stub spawns), serves the same greedy text as
the one-rank ``llm`` model on the same checkpoint, and leaves no worker process once unloaded;
a killed worker fails the stream in flight within 5 s, and the model is reported not ready,
then comes back (the supervisor loads it again) with a new worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.triton_server

PROMPT = "The quick brown fox"
NAME = "llm_tp2"
KILL_ERROR_BOUND_S = 5.0


def _generate(http: requests.Session, url: str, model: str) -> str:
    r = http.post(
        f"{url}/v2/models/{model}/generate",
        json={"text_input": PROMPT, "exclude_input_in_output": True,
              "sampling_parameters": json.dumps({"max_tokens": 24, "temperature": 0})},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["text_output"]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _tp_workers() -> list[str]:
    """Live processes running pagedserve's tensor-parallel worker: spawned interpreters whose
    parent is a Python backend stub."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or "spawn_main" not in _cmdline(proc.name):
            continue
        try:  # the parent's pid is the field after the state, past the ")" of the name
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if "triton_python_backend_stub" in _cmdline(ppid):
            found.append(proc.name)
    return found


@contextlib.contextmanager
def _tp2_model(triton_server):
    """``llm`` copied as NAME with tensor_parallel_size 2, loaded; unloaded and removed after,
    leaving no worker."""
    target = triton_server.repository / NAME
    shutil.copytree(triton_server.repository / "llm", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    engine_args = json.loads((target / "1" / "model.json").read_text())
    engine_args.update(tensor_parallel_size=2, kv_cache_memory_bytes=1 << 24)
    (target / "1" / "model.json").write_text(json.dumps(engine_args))
    repository = f"{triton_server.http_url}/v2/repository/models"
    try:
        with requests.Session() as http:
            loaded = http.post(f"{repository}/{NAME}/load", timeout=600)
            assert loaded.status_code == 200, loaded.text
            yield http
            unloaded = http.post(f"{repository}/{NAME}/unload", timeout=120)
            assert unloaded.status_code == 200, unloaded.text
            deadline = time.monotonic() + 60
            while _tp_workers() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _tp_workers() == []
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_tensor_parallel_2_serves_the_one_rank_text_and_unloads_its_worker(triton_server):
    with _tp2_model(triton_server) as http:
        assert len(_tp_workers()) == 1
        assert _generate(http, triton_server.http_url, NAME) == _generate(
            http, triton_server.http_url, "llm")


def test_a_killed_worker_fails_the_stream_and_the_model_comes_back(triton_server):
    url = triton_server.http_url
    with _tp2_model(triton_server) as http:
        expected = _generate(http, url, "llm")
        started, ended = threading.Event(), []

        def stream() -> None:
            outcome = "clean end"
            try:
                response = requests.post(
                    f"{url}/v2/models/{NAME}/generate_stream",
                    json={"text_input": PROMPT, "stream": True, "sampling_parameters":
                          json.dumps({"max_tokens": 3000, "ignore_eos": True})},
                    stream=True, timeout=300)
                for line in response.iter_lines():
                    if line.startswith(b"data: "):
                        event = json.loads(line[len(b"data: "):])
                        if "error" in event:
                            outcome = f"error: {event['error']}"
                            break
                        started.set()
            except requests.RequestException as e:
                outcome = f"error: {type(e).__name__}: {e}"
            ended.append((time.monotonic(), outcome))

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert started.wait(120), "the stream did not start"
        (worker,) = _tp_workers()
        t0 = time.monotonic()
        os.kill(int(worker), signal.SIGKILL)
        thread.join(KILL_ERROR_BOUND_S + 30)
        assert ended, "the stream did not end after its worker was killed"
        (t1, outcome), = ended
        assert outcome.startswith("error") and "worker rank 1" in outcome, outcome
        assert t1 - t0 <= KILL_ERROR_BOUND_S, t1 - t0
        # Not ready, then back (loaded again by the supervisor) with the same greedy text.
        seen_not_ready = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:  # Triton may hold the answer while it unloads and loads the model
                ready = requests.get(f"{url}/v2/models/{NAME}/ready", timeout=5).ok
            except requests.RequestException:
                ready = False
            seen_not_ready |= not ready
            if ready and seen_not_ready:
                break
            time.sleep(0.2)
        assert seen_not_ready and ready, "the model did not come back"
        assert _generate(http, url, NAME) == expected
        assert len(_tp_workers()) == 1
