"""After its engine dies, the llm model frees it and comes back by itself (serving/recovery.py):
rebuilt in the same process, or unloaded for Triton (and the supervisor) to load again. The
engine is real and dies for real, through the PAGEDSERVE_FAULT_INJECT_FILE test hook."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.fault_injection import ENV_VAR
from pagedserve.serving.recovery import EngineRecovery, Recovery, choose_recovery

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama", "bpe")


class Model:
    """What the llm model gives its EngineRecovery: the engine slot and Triton's unload."""

    def __init__(self, unload_error: Exception | None = None) -> None:
        self.engine = None
        self.unloads: list[str] = []
        self.log: list[str] = []
        self._unload_error = unload_error

    def install(self, engine) -> None:
        self.engine = engine

    def unload(self, reason: str) -> None:
        self.unloads.append(reason)
        if self._unload_error is not None:
            raise self._unload_error


def _recovery(model_dir, how: Recovery, model: Model) -> EngineRecovery:
    args = EngineArgs(model=str(model_dir), block_size=8, max_model_len=256,
                      kv_cache_memory_bytes=16 << 20)
    return EngineRecovery(
        how,
        build=lambda on_dead: AsyncLLMEngine(args, on_dead=on_dead),
        install=model.install,
        wait_drained=lambda timeout: True,
        unload=model.unload,
        log_info=model.log.append,
        log_error=model.log.append,
    )


def _generate(model: Model, request_id: str) -> object:
    """The greedy token ids, or the name of the exception the request ended with."""

    async def run():
        outputs = [o async for o in model.engine.generate("Hello there", GREEDY, request_id)]
        return outputs[-1].outputs[0].token_ids

    try:
        return asyncio.run(run())
    except Exception as e:
        return type(e).__name__


def _kill_engine(model: Model, trigger) -> weakref.ref:
    old = weakref.ref(model.engine.engine)
    trigger.touch()
    assert _generate(model, "dies") == "EngineDeadError"
    return old


def _wait(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def trigger(tmp_path, monkeypatch):
    path = tmp_path / "fail-next-step"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


def test_choice_of_recovery():
    assert choose_recovery(health_check=False, supervised=False) == Recovery.RESTART
    assert choose_recovery(health_check=True, supervised=False) == Recovery.UNLOAD
    assert choose_recovery(health_check=False, supervised=True) == Recovery.UNLOAD


def test_restart_in_process_frees_the_old_engine_and_serves_the_same_text(model, trigger):
    slot = Model()
    recovery = _recovery(model, Recovery.RESTART, slot)
    reference = _generate(slot, "before")
    old = _kill_engine(slot, trigger)
    # The engine fails its requests before it calls on_dead: wait for the restart itself.
    _wait(lambda: recovery.restarts == 1 and recovery.unavailable is None)
    assert any("recovery: restart" in line for line in slot.log), slot.log
    assert old() is None  # the dead engine (model, KV cache) was collected
    assert slot.engine is recovery.engine and not slot.unloads
    assert _generate(slot, "after") == reference
    assert recovery.restarts == 1
    recovery.close().shutdown()


def test_unload_frees_the_engine_and_asks_triton(model, trigger):
    slot = Model()
    recovery = _recovery(model, Recovery.UNLOAD, slot)
    old = _kill_engine(slot, trigger)
    _wait(lambda: slot.unloads)
    assert "InjectedFault" in slot.unloads[0]
    assert "being reloaded" in recovery.unavailable
    _wait(lambda: old() is None)
    assert slot.engine is None and recovery.close() is None


def test_an_engine_still_held_for_a_moment_is_freed_all_the_same(model, trigger):
    # As a request's coroutine may hold it a moment after its error: the recovery must not
    # collect once, too early, and leave the engine to a collection that may never come.
    slot = Model()
    recovery = _recovery(model, Recovery.UNLOAD, slot)
    held = [slot.engine]
    threading.Timer(0.5, held.clear).start()
    old = _kill_engine(slot, trigger)
    _wait(lambda: slot.unloads and not held)
    _wait(lambda: old() is None, timeout=5.0)
    assert not any("still referenced" in line for line in slot.log), slot.log
    assert recovery.close() is None


def test_a_refused_unload_falls_back_to_a_restart(model, trigger):
    slot = Model(unload_error=RuntimeError("explicit model load / unload is not allowed"))
    recovery = _recovery(model, Recovery.UNLOAD, slot)
    reference = _generate(slot, "before")
    _kill_engine(slot, trigger)
    _wait(lambda: recovery.restarts == 1 and recovery.unavailable is None)
    assert slot.unloads and recovery.recovery == Recovery.RESTART
    assert _generate(slot, "after") == reference
    recovery.close().shutdown()


def test_the_reload_note_takes_any_error_text_under_an_ascii_locale(tmp_path):
    """A stub's embedded interpreter may run with an ASCII locale, and errors carry any text
    (gloo's end in an emoji): writing the supervisor's note must not fail on them."""
    import os
    import subprocess
    import sys

    code = ("import pathlib, sys; from pagedserve.serving.recovery import request_reload; "
            "assert sys.getfilesystemencoding() and __import__('locale')"
            ".getpreferredencoding(False).lower() in ('ascii', 'ansi_x3.4-1968'); "
            "request_reload(pathlib.Path(sys.argv[1]), 'llm', 'closed by peer \\U0001f3d6')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True)
    assert (tmp_path / "llm.reload").read_text(encoding="utf-8") == "closed by peer \U0001f3d6"


def test_restart_in_process_after_a_tensor_parallel_worker_died(model):
    """tp 2 (the mp executor): a killed worker kills the engine; the restart leaves
    torch.distributed and the dead ranks behind and serves the same text with new ones."""
    import os
    import signal

    slot = Model()
    args = EngineArgs(model=str(model), block_size=8, max_model_len=256,
                      kv_cache_memory_bytes=16 << 20, tensor_parallel_size=2)
    recovery = EngineRecovery(
        Recovery.RESTART, build=lambda on_dead: AsyncLLMEngine(args, on_dead=on_dead),
        install=slot.install, wait_drained=lambda timeout: True, unload=slot.unload,
        log_info=slot.log.append, log_error=slot.log.append)
    reference = _generate(slot, "before")
    (worker,) = slot.engine.engine.executor._workers.processes
    os.kill(worker.pid, signal.SIGKILL)
    assert _generate(slot, "dies") == "EngineDeadError"
    _wait(lambda: recovery.restarts == 1 and recovery.unavailable is None)
    assert _generate(slot, "after") == reference
    (new_worker,) = slot.engine.engine.executor._workers.processes
    assert new_worker.pid != worker.pid and new_worker.is_alive()
    recovery.close().shutdown()
    new_worker.join(10)
    assert not new_worker.is_alive()
