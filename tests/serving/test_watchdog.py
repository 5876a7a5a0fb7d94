"""The orphan watchdog: a stub whose server died is killed; a stub that exits is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# A "server" that starts a "stub"; the stub starts the watchdog, prints its pid, and hangs
# the way a deadlocked python stub does.
_SERVER = textwrap.dedent("""
    import subprocess, sys, time
    stub = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    time.sleep(600)
""")
_STUB = textwrap.dedent("""
    import os, sys, time
    from pagedserve.serving.watchdog import OrphanWatchdog
    dog = OrphanWatchdog(grace_s={grace})
    print(os.getpid(), flush=True)
    if {exit_now}:
        dog.stop()
        sys.exit(0)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _start(exit_now: bool) -> tuple[subprocess.Popen, int]:
    stub = _STUB.format(grace=0.5, exit_now=exit_now)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, stub], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    return server, int(server.stdout.readline())


def test_stub_is_killed_after_its_server_dies():
    server, stub = _start(exit_now=False)
    try:
        assert _alive(stub)
        time.sleep(1.5)
        assert _alive(stub)  # a live server keeps it alive
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 10
        while _alive(stub) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(stub)
    finally:
        if _alive(stub):
            os.kill(stub, signal.SIGKILL)
        if server.poll() is None:
            server.kill()
            server.wait()


def test_watchdog_stops_with_a_graceful_stub():
    server, stub = _start(exit_now=True)
    try:
        deadline = time.monotonic() + 10
        while _alive(stub) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(stub)
        # No watcher is left behind for this stub.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert f"kill -9 {stub}" not in ps
    finally:
        server.kill()
        server.wait()
