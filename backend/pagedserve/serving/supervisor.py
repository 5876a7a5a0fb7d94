"""Runs tritonserver as a child of ``pagedserve serve`` and brings its models back after faults.

What it watches, every ``poll_interval_s``:

* **a stub process that died** (the OOM killer, a crash) while its model is READY. Triton 2.51
  never notices: the model stays READY, every later request fails with "Stub process is not
  healthy", and the requests in flight hang for good (their responses can only come from the
  dead stub, so no unload of the model ever finishes). Only the end of tritonserver ends
  them, so the supervisor kills it (SIGKILL: clients then see a broken stream, where a
  graceful stop would close an HTTP SSE stream as if it had finished), removes what the dead
  server leaves behind (stubs, shared memory), and starts it again with the same arguments.
* **a model that unloaded itself** after its engine failed (serving/recovery.py): it leaves a
  note in the supervisor's directory (``PAGEDSERVE_SUPERVISOR_DIR``); the supervisor loads it
  again through the model-control API, and with it the models that went down with it (an
  ensemble that uses it).
* **tritonserver itself exiting** unasked, after it had come up: it is started again.

Restarts are limited (``max_restarts`` within ``restart_window_s``); a server that fails before
it ever came up ends ``pagedserve serve`` with its exit status, as before. SIGTERM, SIGINT,
SIGHUP and SIGQUIT are passed to tritonserver, which then shuts down as usual.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pagedserve.serving.recovery import RELOAD_SUFFIX, SUPERVISOR_DIR_ENV
from pagedserve.serving.stubs import StubProcess, live_stubs, orphaned_stubs, remove_shm_region

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SupervisorConfig:
    """How the supervisor reaches the server and how hard it tries to keep it serving."""

    http_url: str  # e.g. "http://127.0.0.1:8000"
    model_control: bool  # whether the server accepts load/unload (explicit mode)
    poll_interval_s: float = 0.5
    snapshot_interval_s: float = 2.0  # how often the set of READY models is refreshed
    max_restarts: int = 5
    restart_window_s: float = 600.0
    load_timeout_s: float = 900.0
    load_attempts: int = 3
    # A model that asked for a reload but is still READY after this long gave up unloading.
    stale_note_s: float = 30.0
    # A stub is gone and the server has not answered for this long: it counts as a crash.
    undecided_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "snapshot_interval_s", "restart_window_s",
                     "load_timeout_s", "stale_note_s", "undecided_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SupervisorConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_restarts < 0 or self.load_attempts < 1:
            raise ValueError("SupervisorConfig: max_restarts must be >= 0, load_attempts >= 1")


class TritonHttp:
    """The few calls of Triton's HTTP API the supervisor makes (standard library only)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _post(self, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def live(self) -> bool:
        """Whether the server answers; its endpoints start once its start-up loads are done
        (``ready`` would also wait for every model, which one failed model prevents)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/live", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def model_states(self) -> Optional[dict[str, str]]:
        """Each model's state in the repository index (READY, UNLOADING, ...), None if the
        server does not answer."""
        try:
            entries = json.loads(self._post("/v2/repository/index", timeout=5))
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return {e["name"]: e.get("state", "") for e in entries}

    def load(self, model: str, timeout: float) -> None:
        """Loads ``model`` (blocks until loaded); raises RuntimeError with Triton's reason."""
        try:
            self._post(f"/v2/repository/models/{model}/load", timeout=timeout)
        except urllib.error.HTTPError as e:
            raise RuntimeError(e.read().decode(errors="replace") or str(e)) from None
        except (OSError, urllib.error.URLError) as e:
            raise RuntimeError(str(e)) from None


def _log(message: str) -> None:
    print(f"pagedserve: {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: tritonserver gets SIGTERM if the supervisor is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class ServerSupervisor:
    """Owns the tritonserver child process, its restarts, and the reloads of its models."""

    def __init__(self, argv: list[str], env: dict[str, str], config: SupervisorConfig) -> None:
        self.argv = argv
        self.config = config
        self.http = TritonHttp(config.http_url)
        self._dir: Optional[Path] = None
        self.env = dict(env)
        if config.model_control:  # models may only ask for a reload where one is possible
            self._dir = Path(tempfile.mkdtemp(prefix="pagedserve-supervisor-"))
            self.env[SUPERVISOR_DIR_ENV] = str(self._dir)
        self.process: Optional[subprocess.Popen] = None
        self._stopping = False
        self._ready_once = False  # the first server came up at some point
        self._ready = False  # the current server is up (its start-up loads are done)
        self._restarts: deque[float] = deque()
        self._stubs: dict[int, StubProcess] = {}
        self._snapshot: set[str] = set()  # models READY before the latest event
        self._snapshot_time = 0.0
        self._reloading: set[str] = set()
        self._note_seen: dict[str, float] = {}  # when a note of a still READY model was seen
        self._undecided: dict[int, float] = {}  # gone stubs the server did not say about yet
        self._lock = threading.Lock()

    # ---- the main loop -------------------------------------------------------------------

    def run(self) -> int:
        """Runs the server until it exits for good; returns the exit status to use."""
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._forward)
        try:
            self._start()
            while True:
                status = self._check_server()
                if status is not None:
                    return status
                if self._ready and not self._stopping:
                    try:
                        status = self._watch()
                    except Exception as e:  # a supervisor bug must not take the server down
                        _log(f"supervisor error: {e!r}")
                        status = None
                    if status is not None:
                        return status
                time.sleep(self.config.poll_interval_s)
        finally:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self._dir is not None:
                for path in self._dir.iterdir():
                    path.unlink(missing_ok=True)
                self._dir.rmdir()

    def _forward(self, signum: int, _frame: object) -> None:
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def _start(self) -> None:
        self._ready = False
        self._stubs = {}
        self.process = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        if self._stopping:  # a signal came while it started: it may have missed it
            self.process.send_signal(signal.SIGTERM)

    def _check_server(self) -> Optional[int]:
        """The exit status to end with once the server is gone for good, else None."""
        status = self.process.poll()
        if status is None:
            if not self._ready and self.http.live():
                self._ready = self._ready_once = True
                self._stubs = live_stubs(self.process.pid)
                _log(f"supervising tritonserver (pid {self.process.pid})")
            return None
        if self._stopping or not self._ready_once:
            return status if status >= 0 else 128 - status
        _log(f"tritonserver exited with status {status}; starting it again")
        return self._restart()

    def _restart(self) -> Optional[int]:
        """Kills what is left of the server and starts it again; the exit status to end with
        when the restart budget is spent."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.config.restart_window_s:
            self._restarts.popleft()
        old = self.process
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)  # the server and the stubs in its group
            old.wait()
        for stub in [*self._stubs.values(), *orphaned_stubs(old.pid)]:
            if stub.alive():
                os.kill(stub.pid, signal.SIGKILL)
            remove_shm_region(stub.shm_region)
        if self._stopping:
            return old.returncode if old.returncode >= 0 else 128 - old.returncode
        if len(self._restarts) >= self.config.max_restarts:
            _log(f"tritonserver was restarted {len(self._restarts)} times within "
                 f"{self.config.restart_window_s:.0f} s; giving up")
            return 1
        self._restarts.append(now)
        if self._dir is not None:  # notes of the old server's models are moot
            for note in self._dir.glob(f"*{RELOAD_SUFFIX}"):
                note.unlink(missing_ok=True)
        self._start()
        return None

    # ---- what is watched while the server is ready ---------------------------------------

    def _watch(self) -> Optional[int]:
        """Handles what happened since the last poll; the exit status to end with, if the
        server had to be restarted and could not be."""
        stubs = live_stubs(self.process.pid)
        crashed = self._crashed_stubs(stubs)
        if crashed:
            names = ", ".join(sorted({s.instance for s in crashed}))
            _log(f"the stub process of {names} died; restarting tritonserver so that its "
                 "requests in flight end")
            return self._restart()
        self._stubs = stubs
        notes = sorted(self._dir.glob(f"*{RELOAD_SUFFIX}")) if self._dir is not None else []
        if notes:
            self._reload_requested(notes)
        elif time.monotonic() - self._snapshot_time >= self.config.snapshot_interval_s:
            states = self.http.model_states()
            if states is not None:
                self._snapshot = {m for m, s in states.items() if s == "READY"}
                self._snapshot_time = time.monotonic()
        return None

    def _crashed_stubs(self, stubs: dict[int, StubProcess]) -> list[StubProcess]:
        """Instance stubs that are gone while their model is READY, with no newer stub of the
        same instance (a reload starts the new stub before the old one exits). Gone stubs
        stay undecided while the server does not say, up to ``undecided_s``."""
        gone = []
        for pid, stub in self._stubs.items():
            if pid in stubs or not stub.serves:
                continue
            if stub.alive():
                # Missing from the server's children lists, yet alive: those lists can skip a
                # child while the process tree changes (a load starting stubs, a thread that
                # forked one ending), and a load in progress once made a live stub look dead.
                stubs[pid] = stub
                continue
            gone.append(stub)
        if not gone:
            return []
        states = self.http.model_states()
        now = time.monotonic()
        crashed = []
        for stub in gone:
            if any(s.instance == stub.instance and s.start_time > stub.start_time
                   for s in stubs.values()):
                continue  # replaced by a reload
            if states is None:
                since = self._undecided.setdefault(stub.pid, now)
                if now - since > self.config.undecided_s:
                    crashed.append(stub)  # the server does not answer either
                else:
                    stubs[stub.pid] = stub  # ask again next time
                continue
            if states.get(stub.model) == "READY":
                crashed.append(stub)
        self._undecided = {p: t for p, t in self._undecided.items() if p in stubs}
        return crashed

    def _reload_requested(self, notes: list[Path]) -> None:
        states = self.http.model_states() or {}
        for note in notes:
            model = note.name[: -len(RELOAD_SUFFIX)]
            if states.get(model) == "READY" and model not in self._reloading:
                # Its unload has not started yet (or it never will: then drop the note).
                seen = self._note_seen.setdefault(model, time.monotonic())
                if time.monotonic() - seen > self.config.stale_note_s:
                    note.unlink(missing_ok=True)
                    self._note_seen.pop(model, None)
                continue
            self._note_seen.pop(model, None)
            note.unlink(missing_ok=True)
            with self._lock:
                if model in self._reloading:
                    continue
                self._reloading.add(model)
            others = sorted(self._snapshot - {model})
            threading.Thread(
                target=self._reload, args=(model, others, self.process.pid),
                name=f"pagedserve-reload-{model}", daemon=True,
            ).start()

    def _reload(self, model: str, others: list[str], server_pid: int) -> None:
        """Loads ``model`` again (a load does not wait for the old instance's unload), then
        the models that were READY before it went and are not now (e.g. its ensemble)."""
        try:
            for attempt in range(1, self.config.load_attempts + 1):
                if self.process.pid != server_pid or self._stopping:
                    return  # the server was restarted meanwhile: it loads everything itself
                _log(f"loading model '{model}' again (attempt {attempt})")
                try:
                    self.http.load(model, self.config.load_timeout_s)
                    break
                except RuntimeError as e:
                    _log(f"loading model '{model}' failed: {e}")
                    time.sleep(min(30.0, 2.0 * attempt))
            else:
                return
            states = self.http.model_states() or {}
            for other in others:
                if states.get(other) != "READY" and self.process.pid == server_pid:
                    try:
                        self.http.load(other, self.config.load_timeout_s)
                    except RuntimeError as e:
                        _log(f"loading model '{other}' failed: {e}")
            _log(f"model '{model}' is loaded again")
        finally:
            with self._lock:
                self._reloading.discard(model)
