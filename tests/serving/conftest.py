"""A real tritonserver, started once per session by ``pagedserve serve``, on free ports.

The model repository is a copy of the shipped ``model_repository/`` configs (unchanged) with
the small ``tiny`` checkpoint at ``llm/1/default_model``, where the shipped configs expect
the default model. If the server cannot start, every test using it fails with the server log.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = float(os.environ.get("PAGEDSERVE_TEST_STARTUP_TIMEOUT", "300"))


@dataclass
class Server:
    """A running tritonserver: its endpoints, its model repository and its log."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self, tail: int = 20000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _model_dir() -> Path:
    """The tiny preset with a SentencePiece (byte-fallback) tokenizer, built once and cached:
    the tokenizer kind whose streamed text TensorRT-LLM's stateless postprocessing garbles
    (leading spaces and multi-byte characters). 4096 positions leave room for requests long
    enough to be cancelled midway."""
    from pagedserve.devtools.tiny_model import build_preset

    root = Path(os.environ.get("PAGEDSERVE_CACHE", REPO_ROOT / ".cache"))
    path = root / "models" / "tiny-sentencepiece-4k"
    if not (path / "config.json").is_file():
        build_preset(path, "tiny", tokenizer="sentencepiece", max_position_embeddings=4096)
    return path


def _make_repository(dest: Path, checkpoint: Path) -> Path:
    shutil.copytree(
        REPO_ROOT / "model_repository",
        dest,
        ignore=shutil.ignore_patterns("default_model", "draft_model", "eagle3_head",
                                      "__pycache__"),
    )
    shutil.copytree(checkpoint, dest / "llm" / "1" / "default_model")
    return dest


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"tritonserver exited with {server.process.returncode} while starting; "
                f"log:\n{server.log()}",
                pytrace=False,
            )
        try:
            if requests.get(f"{server.http_url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    _stop(server.process)
    pytest.fail(
        f"tritonserver was not ready after {STARTUP_TIMEOUT_S:.0f} s; log:\n{server.log()}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def serving_checkpoint() -> Path:
    return _model_dir()


def launch_server(
    root: Path,
    checkpoint: Path,
    extra_args: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
) -> Server:
    """Starts ``pagedserve serve`` under ``root`` (a copy of the shipped repository, free
    ports; explicit model control with every model loaded, so that tests can load more
    models) and waits until it is ready."""
    repository = _make_repository(root / "model_repository", checkpoint)
    http_port, grpc_port, metrics_port = _free_ports(3)
    log_path = root / "tritonserver.log"
    command = [
        sys.executable, "-m", "pagedserve.cli", "serve",
        "--model-repository", str(repository),
        "--model-control-mode", "explicit", "--load-model", "*",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port), "--allow-gpu-metrics", "false",
        "--exit-timeout-secs", "10",
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
            env=env,
        )
    srv = Server(process, http_port, grpc_port, metrics_port, repository, log_path)
    _wait_ready(srv)
    return srv


def stop_server(server: Server) -> None:
    # Client objects caught in reference cycles may still hold HTTP connections, which
    # the server would wait for before unloading the models.
    gc.collect()
    _stop(server.process)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, serving_checkpoint: Path):
    srv = launch_server(tmp_path_factory.mktemp("triton"), serving_checkpoint)
    try:
        yield srv
    finally:
        stop_server(srv)
    # finalize() ran: the engine and the backend's threads stopped cleanly.
    assert "pagedserve: model 'llm' shut down" in srv.log(), srv.log()


@pytest.fixture(scope="module")
def start_triton_server(tmp_path_factory: pytest.TempPathFactory, serving_checkpoint: Path):
    """Starts a server of the test module's own (``launch_server``'s arguments), for tests
    that must not disturb the shared one; each is stopped when the module ends."""
    started: list[Server] = []

    def start(extra_args: Sequence[str] = (), env: Optional[dict[str, str]] = None) -> Server:
        root = tmp_path_factory.mktemp("triton-own")
        started.append(launch_server(root, serving_checkpoint, extra_args, env))
        return started[-1]

    yield start
    for srv in started:
        stop_server(srv)
