"""Replacing an index in one atomic step, and cleaning up after builds that did not finish.

The index a model repository serves, `<retrieve version>/index`, is a relative symlink to a
versioned directory beside it; readers keep opening `index/...`. A build of `index`:

1. writes the new index into a scratch directory `.index.building-<stamp>-<pid>`;
2. renames it to its versioned name `.index.built-<stamp>-<pid>`: complete from then on;
3. makes a temporary symlink `.index.linking-<stamp>-<pid>` to it and renames that onto
   `index`. One rename(2) is atomic on POSIX: whoever resolves `index` finds the whole old
   index or the whole new one, never neither and never a mix;
4. removes the versioned directories other than the new one and the one `index` pointed to
   before (see `publish_index_dir`).

<stamp> is the UTC time the name was made (to the microsecond) and <pid> the process that made
it, so a name says who owns it: scratch directories and temporary links whose process is gone
(killed with SIGKILL, or the machine rebooted) are removed by the next build. Steps 2-4 hold an
exclusive lock (`.index.lock`), so that concurrent builds into one directory cannot remove each
other's new version before it is switched in.

Every name starts with `.index.` (`.<name>.` for an index directory of another name): hidden,
so not part of the template the package ships; git-ignored; and in a source checkout matched by
`.gitignore`, so `make clean` removes them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ecomsearch.pids import process_alive

log = logging.getLogger(__name__)

SCRATCH = "building"  # a version being written
VERSION = "built"  # a complete version, which `index` may link to
LINK = "linking"  # a symlink to a new version, about to be renamed onto `index`
# Left by the writer this module replaced (it renamed `index` away, then the new one in) when
# it was killed between its two renames: `.index.retired-<pid>`, `.index.building-<pid>`.
RETIRED = "retired"
_KINDS = (SCRATCH, VERSION, LINK, RETIRED)


def _name_pattern(index_dir: Path) -> re.Pattern[str]:
    kinds = "|".join(_KINDS)
    return re.compile(
        rf"\.{re.escape(index_dir.name)}\.(?P<kind>{kinds})-(?:\d{{8}}T\d{{12}}Z-)?(?P<pid>\d+)"
    )


def _siblings(index_dir: Path) -> Iterator[tuple[Path, str, int]]:
    """The versions, scratch directories and temporary links beside `index_dir`: each with its
    kind and the pid that made it."""
    if not index_dir.parent.is_dir():
        return
    pattern = _name_pattern(index_dir)
    for path in index_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            yield path, match["kind"], int(match["pid"])


def _sibling(index_dir: Path, kind: str, token: str) -> Path:
    return index_dir.with_name(f".{index_dir.name}.{kind}-{token}")


def _fresh_token(index_dir: Path) -> str:
    """`<stamp>-<pid>`, used by no name beside `index_dir` yet (the clock moves on if it is)."""
    while True:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        token = f"{stamp}-{os.getpid()}"
        if not any(os.path.lexists(_sibling(index_dir, kind, token)) for kind in _KINDS):
            return token


def is_private_name(name: str, index_dir: Path) -> bool:
    """Whether `name`, beside `index_dir`, is one this module keeps there (versions, scratch
    directories, temporary links, the lock): not to be copied with the repository."""
    return name.startswith(f".{index_dir.name}.")


def current_version(index_dir: Path) -> Path | None:
    """The versioned directory `index_dir` links to; None when it is no such link (missing, a
    directory from a build before versioned directories, or a link to somewhere else)."""
    try:
        target = os.readlink(index_dir)
    except OSError:
        return None
    match = _name_pattern(index_dir).fullmatch(target)  # a bare name: never a path elsewhere
    if match is None or match["kind"] != VERSION:
        return None
    return index_dir.parent / target


def index_paths(index_dir: Path) -> list[Path]:
    """What makes up the index at `index_dir`, to move it as a whole: a directory written before
    versioned directories, or the symlink and the versioned directories beside it. Empty when
    there is no index, or `index_dir` links elsewhere (to an index that is not its own)."""
    if index_dir.is_symlink():
        if current_version(index_dir) is None:
            return []
        versions = sorted(path for path, kind, _ in _siblings(index_dir) if kind == VERSION)
        return [index_dir, *versions]
    return [index_dir] if index_dir.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_abandoned(index_dir: Path) -> None:
    """Removes the scratch directories and temporary links beside `index_dir` whose process is
    gone (a build killed too hard to clean up after itself). Those of live processes stay: they
    may be builds in progress."""
    for path, kind, pid in list(_siblings(index_dir)):
        if kind != VERSION and not process_alive(pid):
            log.info("removing %s, left by process %d, which is gone", path, pid)
            _remove(path)


@contextmanager
def _exclusive_lock(index_dir: Path) -> Iterator[None]:
    with open(index_dir.with_name(f".{index_dir.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _migrate(index_dir: Path, link: Path) -> Path:
    """Replaces a real directory `index_dir` (written before versioned directories) by `link`;
    returns the versioned name the old directory now has.

    rename(2) cannot replace a directory by a symlink, so this takes two renames: the old
    directory to a versioned name, where it stays as the previous version, then the link onto
    `index_dir`. Between them `index_dir` does not exist, so once in a repository's life a
    reader can miss the index, for the instant between two system calls. That is the least bad
    order: the new version is complete before the first rename, the link is made before it too,
    and linking the old directory under `index_dir` first would leave the same gap between its
    rename and the new link. (Linux's renameat2(RENAME_EXCHANGE) could swap them atomically, but
    Python does not expose it.) If interrupted between the renames, the old directory is put
    back; only SIGKILL there leaves no `index` until the next build.
    """
    retired = _sibling(index_dir, VERSION, _fresh_token(index_dir))
    try:
        os.rename(index_dir, retired)
        os.replace(link, index_dir)
    except BaseException:
        if not os.path.lexists(index_dir) and retired.is_dir():
            os.rename(retired, index_dir)
        raise
    return retired


def _switch(index_dir: Path, version: Path, link: Path) -> Path | None:
    """Points `index_dir` at `version` through `link`; returns the versioned directory it
    pointed to before, if any."""
    # Relative, so the repository can be moved, copied (COPY in the Dockerfile) or mounted
    # elsewhere with its index.
    os.symlink(version.name, link, target_is_directory=True)
    if index_dir.is_dir() and not index_dir.is_symlink():
        return _migrate(index_dir, link)
    previous = current_version(index_dir)
    os.replace(link, index_dir)  # atomic: the whole old index or the whole new one
    return previous


def _remove_old_versions(index_dir: Path, keep: set[Path | None]) -> None:
    for path, kind, _ in list(_siblings(index_dir)):
        if kind == VERSION and path not in keep:
            log.info("removing the old index version %s", path)
            _remove(path)


def _discard(index_dir: Path, scratch: Path, version: Path, link: Path) -> None:
    """Removes what an unfinished build made, except a version it already switched in."""
    _remove(scratch)
    link.unlink(missing_ok=True)
    if version.exists() and current_version(index_dir) != version:
        _remove(version)


def publish_index_dir(index_dir: Path, write: Callable[[Path], None]) -> Path:
    """Calls write(directory) to write a new version of the index at `index_dir` into an empty
    directory, then switches `index_dir` to it in one atomic step; returns the new version.

    On any failure, KeyboardInterrupt and SystemExit included, `index_dir` is left as it was
    and nothing of the new version remains.

    Cleanup policy: after the switch, the versioned directories beside `index_dir` are removed
    except the new one and the previous one, which a running server may have loaded (on Linux
    its open files survive unlinking anyway; keeping one previous version is a courtesy to a
    reader that resolved `index` just before the switch and is still opening files in it).
    Scratch directories and temporary links are removed by their own build when it fails, or
    by the next build once their process is gone (see `remove_abandoned`).
    """
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(index_dir)
    token = _fresh_token(index_dir)
    scratch, version, link = (_sibling(index_dir, kind, token) for kind in (SCRATCH, VERSION, LINK))
    scratch.mkdir()
    try:
        write(scratch)
        with _exclusive_lock(index_dir):
            os.rename(scratch, version)
            previous = _switch(index_dir, version, link)
            _remove_old_versions(index_dir, keep={version, previous})
    except BaseException:
        _discard(index_dir, scratch, version, link)
        raise
    return version
