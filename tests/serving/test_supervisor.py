"""`pagedserve serve` under its supervisor: the options it gives tritonserver, and what it does
when the server cannot start. (What it does after faults: test_faults.py.)"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pagedserve.serving.launcher import supervised_args
from pagedserve.serving.stubs import StubProcess
from pagedserve.serving.supervisor import ServerSupervisor, SupervisorConfig


def test_no_control_mode_means_explicit_with_every_model_loaded():
    args, config = supervised_args(["--model-repository", "/m", "--http-port", "9000"])
    assert args[-2:] == ["--model-control-mode=explicit", "--load-model=*"]
    assert config.http_url == "http://127.0.0.1:9000" and config.model_control


def test_the_users_choices_are_kept():
    args, config = supervised_args(
        ["--model-repository=/m", "--model-control-mode=poll", "--http-address", "10.1.2.3"]
    )
    assert args == ["--model-repository=/m", "--model-control-mode=poll", "--http-address",
                    "10.1.2.3"]
    assert config.http_url == "http://10.1.2.3:8000" and not config.model_control
    # --load-model without a mode: explicit is added, the user's model list kept.
    args, config = supervised_args(["--model-repository=/m", "--load-model", "llm"])
    assert args[-1] == "--model-control-mode=explicit" and "--load-model=*" not in args
    assert config.model_control
    _, config = supervised_args(["--model-repository=/m", "--http-address=::"])
    assert config.http_url == "http://[::1]:8000"


def test_without_http_there_is_no_supervisor():
    args, config = supervised_args(["--model-repository=/m", "--allow-http=false"])
    assert config is None and args == ["--model-repository=/m", "--allow-http=false"]


@pytest.mark.parametrize("field, value", [("poll_interval_s", 0), ("max_restarts", -1),
                                          ("load_attempts", 0), ("load_timeout_s", -5)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SupervisorConfig("http://127.0.0.1:8000", True, **{field: value})


@pytest.mark.triton_server
def test_a_server_that_cannot_start_ends_serve_with_its_status(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "serve",
         "--model-repository", str(tmp_path / "missing"), "--http-port", "1",
         "--grpc-port", "2", "--metrics-port", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0, result.stderr
    assert "starting it again" not in result.stderr
    assert time.monotonic() - started < 120


@pytest.fixture
def ready_index():
    """An HTTP server that answers Triton's repository index with model 'llm' READY."""
    class Index(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server name
            body = json.dumps([{"name": "llm", "version": "1", "state": "READY"}]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_stub_missing_from_the_listing_but_alive_is_not_a_crash(ready_index):
    # /proc's children lists can skip a child while the process tree changes; a stub the
    # listing missed must not make the supervisor kill the server. One that is really gone
    # (here: its pid's start time no longer matches) while its model is READY is a crash.
    process = subprocess.Popen(["sleep", "60"])
    try:
        supervisor = ServerSupervisor([], {}, SupervisorConfig(ready_index, False))
        state = Path(f"/proc/{process.pid}/stat").read_text()
        start_time = int(state[state.rindex(")") + 2:].split()[19])
        live = StubProcess(process.pid, start_time, 1, "llm", "llm_0_0", "")
        supervisor._stubs = {process.pid: live}
        listed: dict[int, StubProcess] = {}
        assert supervisor._crashed_stubs(listed) == []
        assert listed == {process.pid: live}  # still watched

        gone = StubProcess(process.pid, start_time + 1, 1, "llm", "llm_0_0", "")
        supervisor._stubs = {process.pid: gone}
        assert supervisor._crashed_stubs({}) == [gone]
    finally:
        process.kill()
        process.wait()
