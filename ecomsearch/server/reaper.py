"""Cleans up after a tritonserver process group, whoever stops it and however.

The launcher starts one reaper per server, in a session of its own so that neither a Ctrl-C
meant for the launcher nor a stop of the server's group reaches it. The reaper polls the group:
it remembers every shared-memory region the group's stubs were started with, and

- when the launcher dies (even by SIGKILL, which nothing can catch), kills the whole group;
- when the group is gone (stopped by the launcher, crashed, or killed above), unlinks those
  regions (tritonserver leaves them behind when it does not exit cleanly) and removes the
  server's scratch directories, then exits.

So `ecomsearch serve` killed with -9 leaves no server, no stub, no /dev/shm region and no
temporary directory behind. Run as `python -m ecomsearch.server.reaper`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time

from ecomsearch.pids import process_alive
from ecomsearch.server.processes import group_members, remove_shm_regions, shm_regions

POLL_INTERVAL_S = 0.5


def reap(group: int, owner: int, directories: list[str], poll_interval_s: float) -> set[str]:
    """Watches until the group is gone, killing it if `owner` dies first; then cleans up.
    Returns the region names that were unlinked."""
    regions: set[str] = set()
    while True:
        members = group_members(group)
        regions |= shm_regions(members)
        if not any(m.alive for m in members):
            break
        if not process_alive(owner):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        time.sleep(poll_interval_s)
    removed = set(remove_shm_regions(regions))
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecomsearch.server.reaper")
    parser.add_argument("--group", type=int, required=True, help="process group to watch")
    parser.add_argument("--owner", type=int, required=True, help="pid whose death stops it")
    parser.add_argument("--remove", action="append", default=[], help="directory to delete")
    parser.add_argument("--poll-interval-s", type=float, default=POLL_INTERVAL_S)
    args = parser.parse_args(argv)
    # Signals meant for the launcher's terminal or group are not for the reaper: it exits when
    # its work is done (or by SIGKILL).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    removed = reap(args.group, args.owner, args.remove, args.poll_interval_s)
    if removed:
        print(
            f"ecomsearch reaper: removed {len(removed)} shared-memory regions left by "
            f"tritonserver (process group {args.group})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
