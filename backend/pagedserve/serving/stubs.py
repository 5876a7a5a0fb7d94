"""The python backend's stub processes of a running tritonserver, read from /proc.

Each Python model instance (a Python-based backend such as pagedserve included) runs in a
``triton_python_backend_stub`` child of tritonserver, started as
``stub <model dir>/<version>/model.py <shm region> <shm size> <shm growth> <server pid>
<backend dir> <ipc handle> <name> <runtime dir>``; the name is the instance's
(``<model>_<group>_<index>``), or the model's for the short-lived stub that auto-completes
its configuration while it loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

STUB_NAME = "triton_python_backend_stub"
_SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class StubProcess:
    """One live stub: which model instance it runs, and what it leaves behind if killed."""

    pid: int
    start_time: int  # in clock ticks since boot: tells a reused pid apart
    server_pid: int
    model: str
    instance: str  # e.g. "llm_0_0"; the model's name for an auto-complete stub
    shm_region: str  # its shared memory, /dev/shm/<shm_region>

    @property
    def serves(self) -> bool:
        """Whether it runs a model instance (not the auto-complete of a load)."""
        return self.instance != self.model

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_time


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _read_stub(pid: int) -> Optional[StubProcess]:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 9 or os.path.basename(argv[0].decode(errors="replace")) != STUB_NAME:
        return None
    stat = _stat(pid)
    if stat is None or stat[0] == "Z":
        return None
    try:
        server_pid = int(argv[5])
    except ValueError:
        return None
    model = Path(argv[1].decode(errors="replace")).parent.parent.name
    return StubProcess(pid, stat[1], server_pid, model, argv[8].decode(), argv[2].decode())


def _children(pid: int) -> Optional[list[int]]:
    """The children of every thread of ``pid`` (None where /proc cannot tell)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found: list[int] = []
    readable = False
    for tid in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:  # the thread ended, or the kernel has no such file
            continue
        readable = True
        found.extend(int(c) for c in children.split())
    return found if readable else None


def live_stubs(server_pid: int) -> dict[int, StubProcess]:
    """The live (not zombie) stubs that ``server_pid`` started, by pid (auto-complete stubs
    included: see ``StubProcess.serves``)."""
    children = _children(server_pid)
    candidates = children if children is not None else [int(p) for p in os.listdir("/proc")
                                                         if p.isdigit()]
    stubs = {}
    for pid in candidates:
        stub = _read_stub(pid)
        if stub is not None and stub.server_pid == server_pid:
            stubs[pid] = stub
    return stubs


def orphaned_stubs(server_pid: int) -> list[StubProcess]:
    """Stubs of a server that is gone (a full scan: they are no one's children any more)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stub = _read_stub(int(entry))
            if stub is not None and stub.server_pid == server_pid:
                found.append(stub)
    return found


def remove_shm_region(name: str) -> None:
    """Removes a killed server's shared memory region (the server would have)."""
    if name and "/" not in name:
        (_SHM_DIR / name).unlink(missing_ok=True)
