"""Faults under `pagedserve serve`: every client in flight gets an error, the model reports not
ready, and it comes back by itself, serving the same greedy text.

* an engine failure (injected through the PAGEDSERVE_FAULT_INJECT_FILE test hook, a real
  failure of a real step): errors within 1 s, then the model unloads itself and the
  supervisor loads it again;
* the llm's stub process killed with SIGKILL (as the OOM killer would): errors within 5 s,
  then the supervisor restarts tritonserver.

Both run on a server of their own (the second one restarts it). Under a plain tritonserver
(no supervisor) the engine is rebuilt in its stub instead, or, with ENABLE_VLLM_HEALTH_CHECK,
the model unloads itself as in vllm_backend. `pytest -s` shows the times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest
import requests
from serving_client import GrpcStream, tensor

from pagedserve.engine.fault_injection import ENV_VAR
from pagedserve.serving.stubs import live_stubs

pytestmark = pytest.mark.triton_server

LONG = json.dumps({"max_tokens": 3000, "ignore_eos": True, "temperature": 0})
ENGINE_ERROR_BOUND_S = 1.0
STUB_ERROR_BOUND_S = 5.0
NOT_READY_BOUND_S = 5.0
# The model is back within 60 s; a restarted server can be no faster than this machine starts
# one, so where starting it took longer the bound grows with that (the machine is shared).
BACK_BOUND_S = 60.0


@dataclass
class FaultServer:
    server: object
    trigger: str
    start_s: float  # how long the first start took (server and models ready)
    reference: str = ""

    @property
    def back_bound_s(self) -> float:
        return max(BACK_BOUND_S, 1.5 * self.start_s + 5.0)


@pytest.fixture(scope="module")
def fault_server(start_triton_server, tmp_path_factory):
    trigger = str(tmp_path_factory.mktemp("fault") / "fail-next-step")
    started = time.monotonic()
    server = start_triton_server(env={**os.environ, ENV_VAR: trigger})
    fault = FaultServer(server, trigger, time.monotonic() - started)
    fault.reference = _greedy_text(server)
    return fault


def _greedy_text(server) -> str:
    r = requests.post(
        f"{server.http_url}/v2/models/llm/generate",
        json={"text_input": "The quick brown fox", "max_tokens": 12, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["text_output"]


@dataclass
class Client:
    """One streaming client in flight: when its stream ended and how."""

    kind: str
    tokens: int = 0
    ended_at: Optional[float] = None
    outcome: str = ""  # "error: ..." or "clean end"
    started: threading.Event = field(default_factory=threading.Event)

    def end(self, outcome: str) -> None:
        if self.ended_at is None:
            self.ended_at, self.outcome = time.monotonic(), outcome


def _grpc_client(server) -> tuple[Client, threading.Thread]:
    client = Client("gRPC stream")
    stream = GrpcStream(server.grpc_url)
    stream.send("llm", [tensor("text_input", "Tell me a long story"), tensor("stream", True),
                        tensor("sampling_parameters", LONG)])

    def read():
        try:
            while True:
                result, error = stream.queue.get(timeout=300)
                if error is not None:
                    client.end(f"error: {error}")
                    return
                client.tokens += 1
                if client.tokens >= 3:
                    client.started.set()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    client.end("clean end")
                    return
        finally:
            stream.client.close()

    return client, threading.Thread(target=read, daemon=True)


def _sse_client(server) -> tuple[Client, threading.Thread]:
    client = Client("HTTP generate_stream")

    def read():
        try:
            response = requests.post(
                f"{server.http_url}/v2/models/llm/generate_stream",
                json={"text_input": "Once upon a time", "stream": True,
                      "sampling_parameters": LONG},
                stream=True, timeout=300,
            )
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[len(b"data: "):])
                    if "error" in event:
                        client.end(f"error: {event['error']}")
                        return
                    client.tokens += 1
                    if client.tokens >= 3:
                        client.started.set()
            client.end("clean end")
        except requests.RequestException as e:  # a broken stream is an error too
            client.end(f"error: {type(e).__name__}: {e}")

    return client, threading.Thread(target=read, daemon=True)


def _clients_in_flight(server) -> list[tuple[Client, threading.Thread]]:
    clients = [_grpc_client(server), _grpc_client(server), _sse_client(server)]
    for _, thread in clients:
        thread.start()
    for client, _ in clients:
        assert client.started.wait(120), f"{client.kind} did not start streaming"
    return clients


def _ready(server) -> bool:
    try:
        return requests.get(f"{server.http_url}/v2/models/llm/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _watch_recovery(fault: FaultServer, t0: float) -> tuple[float, float]:
    """(seconds until the model was seen not ready, seconds until it served the reference
    greedy text again), both from ``t0``."""
    server = fault.server
    not_ready = None
    deadline = t0 + fault.back_bound_s + 60
    while time.monotonic() < deadline:
        ready = _ready(server)
        now = time.monotonic()
        if not ready and not_ready is None:
            not_ready = now - t0
        if ready and not_ready is not None:
            try:
                if _greedy_text(server) == fault.reference:
                    return not_ready, time.monotonic() - t0
            except (AssertionError, requests.RequestException):
                pass
        if not_ready is None and now - t0 > NOT_READY_BOUND_S:
            pytest.fail(f"the model still reports ready {now - t0:.1f} s after the fault")
        time.sleep(0.1)
    pytest.fail(f"the model was not back within {deadline - t0:.0f} s; log:\n{server.log()}")


def _assert_errors(clients, t0: float, bound_s: float, what: str) -> float:
    for _, thread in clients:
        thread.join(timeout=bound_s + 30)
    latencies = []
    for client, _ in clients:
        assert client.ended_at is not None, f"{client.kind} got nothing after the {what}"
        assert client.outcome.startswith("error"), (client.kind, client.outcome)
        latencies.append(client.ended_at - t0)
    worst = max(latencies)
    assert worst <= bound_s, (what, [(c.kind, c.outcome) for c, _ in clients], latencies)
    return worst


def _tritonserver_pid(server) -> int:
    """The tritonserver that the supervisor (``pagedserve serve``) runs now."""
    children = subprocess.check_output(["pgrep", "-P", str(server.process.pid)]).split()
    assert len(children) == 1, children
    return int(children[0])


def _models_ready(server, names) -> bool:
    return all(
        requests.get(f"{server.http_url}/v2/models/{n}/ready", timeout=5).status_code == 200
        for n in names
    )


def test_engine_failure_errors_every_stream_and_the_model_comes_back(fault_server):
    server = fault_server.server
    clients = _clients_in_flight(server)
    t0 = time.monotonic()
    open(fault_server.trigger, "w").close()  # the engine's next step raises
    worst = _assert_errors(clients, t0, ENGINE_ERROR_BOUND_S, "engine failure")
    assert all("InjectedFault" in c.outcome for c, _ in clients), [c.outcome for c, _ in clients]
    not_ready, back = _watch_recovery(fault_server, t0)
    print(f"\nengine failure: every stream errored within {worst * 1000:.0f} ms, not ready after "
          f"{not_ready:.2f} s, back (same greedy text) after {back:.1f} s")
    assert back <= fault_server.back_bound_s
    assert _models_ready(server, ["llm", "ensemble", "preprocessing"])
    assert not os.path.exists(fault_server.trigger)


def test_killed_stub_errors_every_stream_and_the_server_comes_back(fault_server):
    server = fault_server.server
    clients = _clients_in_flight(server)
    stubs = [s for s in live_stubs(_tritonserver_pid(server)).values()
             if s.model == "llm" and s.serves]
    stub = max(stubs, key=lambda s: s.start_time)  # an old one may linger after a reload
    t0 = time.monotonic()
    os.kill(stub.pid, signal.SIGKILL)
    worst = _assert_errors(clients, t0, STUB_ERROR_BOUND_S, "stub kill")
    not_ready, back = _watch_recovery(fault_server, t0)
    print(f"\nkilled stub: every stream errored within {worst:.2f} s, not ready after "
          f"{not_ready:.2f} s, back (same greedy text) after {back:.1f} s (the first start "
          f"took {fault_server.start_s:.1f} s)")
    assert back <= fault_server.back_bound_s
    assert _models_ready(server, ["llm", "ensemble", "preprocessing"])
    assert "restarting tritonserver" in server.log()


def test_tritonserver_that_dies_is_started_again(fault_server):
    """Triton 2.51 itself sometimes aborts when a stub dies; the supervisor starts it again."""
    server = fault_server.server
    clients = _clients_in_flight(server)
    t0 = time.monotonic()
    os.kill(_tritonserver_pid(server), signal.SIGKILL)
    worst = _assert_errors(clients, t0, STUB_ERROR_BOUND_S, "server kill")
    not_ready, back = _watch_recovery(fault_server, t0)
    print(f"\nkilled tritonserver: every stream errored within {worst:.2f} s, back after "
          f"{back:.1f} s")
    assert back <= fault_server.back_bound_s
    assert "tritonserver exited with status -9; starting it again" in server.log()


@pytest.fixture(scope="module")
def plain_server(start_triton_server, tmp_path_factory):
    """tritonserver without the supervisor, with a second llm that has vllm_backend's health
    check on."""
    trigger = str(tmp_path_factory.mktemp("plain-fault") / "fail-next-step")
    env = {**os.environ, ENV_VAR: trigger, "PAGEDSERVE_SUPERVISE": "0"}
    server = start_triton_server(env=env)
    target = server.repository / "llm_hc"
    shutil.copytree(server.repository / "llm", target)
    with open(target / "config.pbtxt", "a") as config:
        config.write('\nparameters: { key: "ENABLE_VLLM_HEALTH_CHECK" '
                     'value: { string_value: "true" } }\n')
    r = requests.post(f"{server.http_url}/v2/repository/models/llm_hc/load", timeout=600)
    assert r.status_code == 200, r.text
    return FaultServer(server, trigger, 0.0, _greedy_text(server))


def _ready_model(server, name: str) -> bool:
    try:
        r = requests.get(f"{server.http_url}/v2/models/{name}/ready", timeout=2)
    except requests.RequestException:
        return False
    return r.status_code == 200


def test_plain_tritonserver_rebuilds_the_engine_in_place(plain_server):
    server = plain_server.server
    clients = _clients_in_flight(server)
    t0 = time.monotonic()
    open(plain_server.trigger, "w").close()
    worst = _assert_errors(clients, t0, ENGINE_ERROR_BOUND_S, "engine failure")
    while True:  # Triton 2.51 gives a Python model no way to say it is not ready
        assert _ready_model(server, "llm")
        try:
            if _greedy_text(server) == plain_server.reference:
                break
        except AssertionError as e:
            assert "unhealthy pagedserve engine" in str(e), e
        assert time.monotonic() - t0 < 60, "the engine was not rebuilt"
        time.sleep(0.1)
    back = time.monotonic() - t0
    print(f"\nplain tritonserver, engine failure: errors within {worst * 1000:.0f} ms, the "
          f"rebuilt engine served the same greedy text after {back:.1f} s")
    assert "the engine was restarted (1 so far)" in server.log()


def test_health_check_unloads_the_model_as_vllm_backend_does(plain_server):
    server = plain_server.server
    stream = GrpcStream(server.grpc_url)
    try:
        stream.send("llm_hc", [tensor("text_input", "Tell me a long story"),
                               tensor("stream", True), tensor("sampling_parameters", LONG)])
        first = stream.queue.get(timeout=60)
        assert first[1] is None, first[1]
        t0 = time.monotonic()
        open(plain_server.trigger, "w").close()
        while True:
            result, error = stream.queue.get(timeout=30)
            if error is not None:
                break
        errored = time.monotonic() - t0
        assert "the engine failed" in str(error)
    finally:
        stream.close()
    deadline = time.monotonic() + 30
    while _ready_model(server, "llm_hc"):
        assert time.monotonic() < deadline, "llm_hc still reports ready"
        time.sleep(0.1)
    not_ready = time.monotonic() - t0
    print(f"\nENABLE_VLLM_HEALTH_CHECK: the stream errored after {errored * 1000:.0f} ms, the "
          f"model reported not ready after {not_ready:.2f} s and stays unloaded")
    assert errored <= ENGINE_ERROR_BOUND_S
    time.sleep(2)
    assert not _ready_model(server, "llm_hc")
    assert _ready_model(server, "llm")  # the other model is untouched
