"""What a tritonserver process group is made of, read from /proc: its Python-backend stubs (one
per model instance) and the shared-memory regions they talk to the server through.

Linux only, like the server. Everything here tolerates processes vanishing while it reads.
"""

from __future__ import annotations

import ctypes
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SHM_DIR = Path("/dev/shm")
STUB_EXECUTABLE = "triton_python_backend_stub"
# The Python backend names each instance's region after its backend and a UUID, e.g.
# triton_python_backend_shm_region_<uuid>; the drop-in onnxruntime backend's are alike.
SHM_REGION = re.compile(r"^triton_[a-z_]+_shm_region_[0-9a-f-]{36}$")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Process:
    pid: int
    state: str  # R, S, D, Z (zombie: dead, not yet reaped), ...
    argv: tuple[str, ...]
    cpu_ticks: int = 0  # user + system CPU time so far, in clock ticks (SC_CLK_TCK)

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


@dataclass(frozen=True)
class StubInstance:
    """One model instance's stub, from the arguments the Python backend starts it with:
    `<stub> <model file> <shm region> <shm size> <growth> <server pid> <backend dir> <default
    size> <instance name> <runtime dir or DEFAULT>`."""

    pid: int
    model: str
    instance: str
    shm_region: str
    alive: bool

    @classmethod
    def from_process(cls, process: Process) -> StubInstance | None:
        argv = process.argv
        if len(argv) < 9 or not argv[0].endswith(STUB_EXECUTABLE):
            return None
        # <repository>/<model>/<version>/model.py (or model.onnx for the drop-in backend)
        model = Path(argv[1]).parent.parent.name
        return cls(process.pid, model, argv[8], argv[2], process.alive)


def group_members(pgid: int) -> list[Process]:
    """The processes of process group `pgid` (zombies included, marked by their state)."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone while we read
            continue
        # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
        # stime ...: comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pgid:
            continue
        members.append(
            Process(
                int(entry.name),
                fields[0],
                tuple(a.decode(errors="replace") for a in argv if a),
                int(fields[11]) + int(fields[12]),
            )
        )
    return members


def cpu_seconds_by_process(pgid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by the live members of process group `pgid`, by
    what each is: a stub by its model's name (its instances summed), the server as
    "tritonserver". A difference of two readings prices the work done between them."""
    import os

    ticks_per_second = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for process in group_members(pgid):
        stub = StubInstance.from_process(process)
        name = stub.model if stub else Path(process.argv[0]).name if process.argv else "?"
        totals[name] = totals.get(name, 0.0) + process.cpu_ticks / ticks_per_second
    return totals


def group_cpu_seconds(pgid: int) -> float:
    """CPU time used so far by the live members of process group `pgid`: the server and its
    stubs."""
    return sum(cpu_seconds_by_process(pgid).values())


def stubs(members: Iterable[Process]) -> list[StubInstance]:
    return [s for s in map(StubInstance.from_process, members) if s is not None]


def shm_regions(members: Iterable[Process]) -> set[str]:
    """Shared-memory region names the processes were started with."""
    return {arg for process in members for arg in process.argv if SHM_REGION.match(arg)}


def remove_shm_regions(names: Iterable[str]) -> list[str]:
    """Unlinks the regions that still exist; returns the names removed."""
    removed = []
    for name in sorted(names):
        if not SHM_REGION.match(name):  # never anything but a Triton region
            continue
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """In a child before exec: ask the kernel to send `sig` when the parent thread exits.

    Only the thread that started the child counts as its parent here, so servers must be
    started from a thread that lives as long as they should (the main thread, in practice).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
