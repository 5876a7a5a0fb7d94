"""Ends this python stub if tritonserver dies without unloading the model.

The python backend (r24.10) stub can deadlock when its server is killed while a response or a
metric update is in flight: the call waits forever for the server, holding the GIL, and the
stub's own exit path then blocks on a mutex. The orphan keeps its memory (on a GPU, the whole
KV cache) until killed by hand. No Python thread can help once the GIL is held, so a tiny
shell process watches instead: once the server is gone for ``grace_s`` seconds and the stub is
still there, it sends SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional


class OrphanWatchdog:
    """Owns the watcher process of one stub; ``stop()`` ends it at a graceful unload."""

    def __init__(self, grace_s: float = 10.0) -> None:
        server, stub = os.getppid(), os.getpid()
        # The stub is recognized by its start time too, so that a reused pid is never killed.
        script = (
            "st() { awk '{print $22}' /proc/$1/stat 2>/dev/null; }; "
            f"start=$(st {stub}); "
            f'while kill -0 {server} 2>/dev/null && [ "$(st {stub})" = "$start" ]; '
            "do sleep 1; done; "
            f'[ "$(st {stub})" = "$start" ] || exit 0; sleep {grace_s}; '
            f'[ "$(st {stub})" = "$start" ] && kill -9 {stub}'
        )
        self._process: Optional[subprocess.Popen] = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # signals meant for the server's group do not reach it
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None
