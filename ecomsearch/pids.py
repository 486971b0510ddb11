"""Whether a process is running: the one test every "is its owner gone?" clean-up uses (index
builds' scratch space, the embedding cache's half-written files, the reaper's launcher).
Dependency-free; Linux's /proc tells a zombie from a running process."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs, as far as this process can see.

    A zombie (dead, not yet collected by its parent) does not. A process in another PID
    namespace (another container sharing a directory) looks dead: its scratch space would be
    removed, and its build fail loudly when it renames it."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: the existence and permission checks only
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # gone since the signal check
    return state not in ("Z", "X")
