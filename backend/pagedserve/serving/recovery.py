"""What the llm model does once its engine has died: refuse requests, then come back.

The engine fails every request in flight the moment it dies (AsyncLLMEngine). From then on
``execute`` answers UNAVAILABLE at once, the dead engine is freed (its model and KV cache:
on a GPU most of the memory), and the model recovers on its own, in one of two ways:

* **unload**: the model asks Triton to unload it (``pb_utils.unload_model``, which needs
  ``--model-control-mode=explicit``), so that Triton reports it not ready at once. Under
  ``pagedserve serve`` the model first leaves a note in the supervisor's directory, and the
  supervisor loads it again. Triton 2.51 finishes an unload only once every gRPC stream that
  sent the model a request has closed, so a load does not wait for that: the new instance
  starts beside the old stub, which by then holds no engine. Chosen when the model is
  supervised, or when ``ENABLE_VLLM_HEALTH_CHECK`` is true (as in vllm_backend, which
  unloads an unhealthy model and leaves it unloaded).
* **restart**: otherwise, or when Triton refuses the unload (another control mode), the
  engine is rebuilt in this process. Triton 2.51 gives a Python model no way to report
  itself not ready while it stays loaded (``is_ready()`` arrives in 26.03), so the model
  stays READY meanwhile, answering UNAVAILABLE.
"""

from __future__ import annotations

import enum
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

# Set by the supervisor of ``pagedserve serve`` for tritonserver and so for every stub.
SUPERVISOR_DIR_ENV = "PAGEDSERVE_SUPERVISOR_DIR"
RELOAD_SUFFIX = ".reload"
# How long the old engine's requests may take to send their errors before it is freed.
DRAIN_TIMEOUT_S = 10.0


class Recovery(enum.Enum):
    """How a model with a dead engine comes back."""

    UNLOAD = "unload"  # Triton unloads it (and the supervisor, if any, loads it again)
    RESTART = "restart"  # the engine is rebuilt in the same process


def supervisor_dir() -> Optional[Path]:
    """The supervisor's directory when this stub runs under ``pagedserve serve``."""
    path = os.environ.get(SUPERVISOR_DIR_ENV)
    return Path(path) if path and os.path.isdir(path) else None


def choose_recovery(health_check: bool, supervised: bool) -> Recovery:
    return Recovery.UNLOAD if health_check or supervised else Recovery.RESTART


def request_reload(directory: Path, model_name: str, reason: str, cancel: bool = False) -> None:
    """Tells the supervisor that ``model_name`` unloads itself and wants to be loaded again
    (``cancel``: that it does not, after all)."""
    target = directory / f"{model_name}{RELOAD_SUFFIX}"
    if cancel:
        target.unlink(missing_ok=True)
        return
    tmp = directory / f".{model_name}.{os.getpid()}.tmp"
    tmp.write_text(reason, encoding="utf-8")  # a stub's locale may be ASCII; errors are not
    os.replace(tmp, target)


class EngineRecovery:
    """Owns the health state of one model's engine and the thread that brings it back.

    ``build(on_dead)`` makes a new engine; ``install(engine)`` hands it to the model (None
    while there is none); ``wait_drained(timeout)`` waits until every request in flight has
    had its final response; ``unload(reason)`` asks Triton to unload the model and raises if
    Triton refuses.
    """

    def __init__(
        self,
        recovery: Recovery,
        build: Callable[[Callable[[Any], None]], Any],
        install: Callable[[Optional[Any]], None],
        wait_drained: Callable[[float], bool],
        unload: Callable[[str], None],
        log_info: Callable[[str], None],
        log_error: Callable[[str], None],
    ) -> None:
        self.recovery = recovery
        self._build = build
        self._install = install
        self._wait_drained = wait_drained
        self._unload = unload
        self._log_info = log_info
        self._log_error = log_error
        self._lock = threading.Lock()
        self._unhealthy: Optional[str] = None  # why, while the model cannot serve
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.restarts = 0
        self.engine: Optional[Any] = build(self.engine_died)
        install(self.engine)

    @property
    def unavailable(self) -> Optional[str]:
        """The message for a request that arrives while the engine is down, else None."""
        why = self._unhealthy
        if why is None:
            return None
        action = "being reloaded" if self.recovery == Recovery.UNLOAD else "restarting"
        return f"Model is unavailable due to unhealthy pagedserve engine ({why}); it is {action}"

    def engine_died(self, error: Any) -> None:
        """The engine's on_dead callback (called on its thread, after its requests failed)."""
        with self._lock:
            if self._unhealthy is not None or self._closing:
                return
            self._unhealthy = str(error)
            self._thread = threading.Thread(
                target=self._recover, name="pagedserve-recovery", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 600.0) -> Optional[Any]:
        """Stops recovering (at finalize); returns the engine to shut down, if any."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return self.engine

    def _recover(self) -> None:
        why = self._unhealthy
        self._log_error(f"pagedserve: {why}; recovery: {self.recovery.value}")
        self._release()
        if self.recovery == Recovery.UNLOAD:
            try:
                self._unload(why)
                return  # Triton finalizes the model; the supervisor, if any, loads it again
            except Exception as e:
                self._log_error(
                    f"pagedserve: Triton did not unload the model ({e}); restarting the engine "
                    "in this process instead"
                )
                self.recovery = Recovery.RESTART
        self._rebuild()

    def _release(self) -> None:
        """Frees the dead engine once its requests have had their errors."""
        old, self.engine = self.engine, None
        self._install(None)
        if not self._wait_drained(DRAIN_TIMEOUT_S):
            self._log_error("pagedserve: requests of the failed engine are still in flight")
        old.shutdown()
        gone = weakref.ref(old)
        del old
        # A request's coroutine may still hold the engine for a moment after its final
        # response; what it leaves behind after that sits in cycles that only a collection
        # frees (and a rebuild must not start beside the old KV cache), so collect until the
        # engine is gone.
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        free_memory()
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            free_memory()
        if gone() is not None:
            self._log_error("pagedserve: the failed engine is still referenced; its memory "
                            "is freed once that reference goes")

    def _rebuild(self) -> None:
        with self._lock:
            if self._closing:
                return
        try:
            engine = self._build(self.engine_died)
        except Exception as e:
            self._log_error(f"pagedserve: the engine could not be restarted: {e!r}")
            with self._lock:
                self._unhealthy = f"{self._unhealthy}; the restart failed: {e}"
            return
        with self._lock:
            self.engine = engine
            if self._closing:
                return
            self.restarts += 1
            self._install(engine)
            self._unhealthy = None
        self._log_info(f"pagedserve: the engine was restarted ({self.restarts} so far)")


def free_memory() -> None:
    """Collects what nothing refers to any more, a freed engine's model and KV cache included
    (they sit among the objects the engine froze out of the collector's sight), and hands a
    GPU's cached blocks back to the driver."""
    gc.unfreeze()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
