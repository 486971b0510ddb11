"""Index builds replace the index in one atomic step (a symlink switched to a new versioned
directory) and clean up after themselves, even when interrupted or killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.index import atomic
from ecomsearch.index.builder import EmbeddingCache
from ecomsearch.index.manifest import IndexLoadError, IndexManifest
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import LexicalIndex
from tests.project import PROJECT_ROOT

ENCODER = "encoder"
DIMENSION = 8
# Readers and switches in the atomicity test. Against the writer this module replaced (rename
# `index` away, then the new one in) 30 switches gave 128-169 failed reads in three runs.
SWITCHES = 30


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "retrieve" / "1" / "index"


@pytest.fixture
def build(index_dir: Path, tiny_index_factory) -> Callable[[int], None]:
    """Builds the index with `rows` products (so each build's manifest tells it apart)."""

    def build(rows: int) -> None:
        tiny_index_factory(index_dir, ENCODER, rows=rows, dimension=DIMENSION, seed=rows)

    return build


def siblings(index_dir: Path) -> list[str]:
    """What lies beside the index, but for the index and the lock."""
    return sorted(
        p.name for p in index_dir.parent.iterdir() if p.name not in ("index", ".index.lock")
    )


def versions(index_dir: Path) -> list[str]:
    return [name for name in siblings(index_dir) if name.startswith(".index.built-")]


def count(path: Path) -> int:
    return CatalogIndex.load(path, encoder_fingerprint=ENCODER, dimension=DIMENSION).count


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_rebuild_switches_the_index_symlink_and_keeps_one_previous_version(
    index_dir: Path, build
) -> None:
    build(3)
    first = index_dir.resolve()
    assert index_dir.is_symlink() and index_dir.is_dir()
    assert os.readlink(index_dir) == first.name  # relative: the repository can move
    assert first.parent == index_dir.parent and first.name.startswith(".index.built-")
    assert siblings(index_dir) == [first.name]

    build(4)
    second = index_dir.resolve()
    assert count(index_dir) == 4 and IndexManifest.read(index_dir).count == 4
    assert siblings(index_dir) == sorted([first.name, second.name])
    assert count(first) == 3, "the previous version stays whole"

    build(5)
    assert count(index_dir) == 5
    assert siblings(index_dir) == sorted([second.name, index_dir.resolve().name])


def test_a_real_index_directory_from_an_older_build_is_migrated(
    tmp_path: Path, index_dir: Path, build
) -> None:
    build(3)
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)  # a real directory, as the old writer left it
    shutil.rmtree(index_dir.parent)
    index_dir.parent.mkdir()
    old.rename(index_dir)

    build(4)
    assert index_dir.is_symlink() and count(index_dir) == 4
    (migrated,) = set(versions(index_dir)) - {index_dir.resolve().name}
    assert count(index_dir.parent / migrated) == 3, "the old directory is the previous version"
    assert len(siblings(index_dir)) == 2

    build(5)
    assert migrated not in siblings(index_dir) and len(siblings(index_dir)) == 2


def test_an_index_linking_elsewhere_is_replaced_and_its_target_left_alone(
    tmp_path: Path, index_dir: Path, tiny_index_factory, build
) -> None:
    elsewhere = tmp_path / "elsewhere" / "index"
    tiny_index_factory(elsewhere, ENCODER, rows=3, dimension=DIMENSION)
    index_dir.parent.mkdir(parents=True)
    index_dir.symlink_to(elsewhere.resolve(), target_is_directory=True)

    build(4)
    assert count(index_dir) == 4 and count(elsewhere) == 3


def raise_keyboard_interrupt(*args, **kwargs) -> None:
    raise KeyboardInterrupt


def interrupt_the_switch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes renaming the new link onto the index raise KeyboardInterrupt; returns a list that
    records each time it did."""
    replace, interrupted = os.replace, []

    def replace_unless_switching(source: str | Path, destination: str | Path) -> None:
        if Path(source).name.startswith(".index.linking-"):
            interrupted.append(str(source))
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace_unless_switching)
    return interrupted


def half_save_then_exit(self: LexicalIndex, directory: Path) -> None:
    directory.mkdir()
    (directory / "title").write_text("half written")
    raise SystemExit(1)


@pytest.mark.parametrize("step", ["faiss index", "lexical fields", "switch"])
def test_an_interrupted_build_leaves_the_old_index_and_no_scratch(
    index_dir: Path, build, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    import faiss

    build(3)
    before = siblings(index_dir)
    interrupted: list[str] = []
    if step == "faiss index":
        monkeypatch.setattr(faiss, "write_index", raise_keyboard_interrupt)
    elif step == "lexical fields":
        monkeypatch.setattr(LexicalIndex, "save", half_save_then_exit)
    else:  # the new version is complete and renamed, the link made but not switched in
        interrupted = interrupt_the_switch(monkeypatch)

    with pytest.raises((KeyboardInterrupt, SystemExit)):
        build(4)
    monkeypatch.undo()
    assert len(interrupted) == (step == "switch")

    assert count(index_dir) == 3
    assert siblings(index_dir) == before, "nothing of the interrupted build remains"


def test_an_interrupted_migration_puts_the_old_directory_back(
    tmp_path: Path, index_dir: Path, build, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(3)
    real = tmp_path / "real"
    shutil.copytree(index_dir, real)
    shutil.rmtree(index_dir.parent)
    index_dir.parent.mkdir()
    real.rename(index_dir)

    interrupted = interrupt_the_switch(monkeypatch)  # after the old directory is renamed
    with pytest.raises(KeyboardInterrupt):
        build(4)
    monkeypatch.undo()

    assert interrupted and not index_dir.is_symlink() and count(index_dir) == 3
    assert siblings(index_dir) == []


# Builds an index of two products into argv[1], printing the scratch directory and then
# blocking halfway through writing it, until killed.
KILLED_BUILD = """
import sys
from pathlib import Path

import numpy as np

from ecomsearch.catalog import Product
from ecomsearch.index import builder
from ecomsearch.lexical import LexicalIndex


def save_then_block(self, directory):
    directory.mkdir()
    print(directory.parent, flush=True)
    sys.stdin.read()


LexicalIndex.save = save_then_block
products = [Product(id="a", title="Cordless drill"), Product(id="b", title="Claw hammer")]
snapshot = builder.CatalogSnapshot(
    products, np.arange(2), np.eye(2, 8, dtype=np.float32), "encoder", "catalog"
)
builder.write_index(Path(sys.argv[1]), snapshot)
"""


def test_a_killed_build_leaves_the_old_index_and_the_next_build_removes_its_scratch(
    index_dir: Path, build
) -> None:
    build(3)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(index_dir)],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        scratch = Path(child.stdout.readline().strip())
        assert scratch.name.startswith(".index.building-"), child.communicate(timeout=10)
        assert scratch.name.endswith(f"-{child.pid}") and (scratch / "index.faiss").is_file()

        build(4)  # a concurrent build: the scratch of a live process is not touched
        assert count(index_dir) == 4 and scratch.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()  # reaped: a zombie still counts as a live process

    assert count(index_dir) == 4, "a build killed halfway changes nothing"
    assert scratch.is_dir(), "SIGKILL leaves no chance to clean up"
    build(5)
    assert not scratch.exists()
    assert count(index_dir) == 5 and len(siblings(index_dir)) == 2


def test_only_the_scratch_of_processes_that_are_gone_is_removed(index_dir: Path, build) -> None:
    build(3)
    gone, alive = dead_pid(), os.getpid()
    stamp = "20240101T000000000000Z"
    leftovers = {
        f".index.building-{gone}": "dir",  # as the writer this module replaced named them
        f".index.retired-{gone}": "dir",
        f".index.building-{stamp}-{gone}": "dir",
        f".index.linking-{stamp}-{gone}": "link",
    }
    kept = {f".index.building-{stamp}-{alive}": "dir", ".index-notes": "dir", "index.bak": "dir"}
    for name, kind in {**leftovers, **kept}.items():
        path = index_dir.parent / name
        if kind == "dir":
            path.mkdir()
        else:
            path.symlink_to(index_dir.resolve().name)

    build(4)
    remaining = set(siblings(index_dir))
    assert not remaining & set(leftovers)
    assert set(kept) <= remaining


def test_readers_never_miss_the_index_while_it_is_switched(index_dir: Path, build) -> None:
    build(3)
    stop = threading.Event()
    failures: list[str] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        while not stop.is_set():
            reads += 1
            try:
                if IndexManifest.read(index_dir).count not in (3, 4):
                    failures.append("another index")
            except IndexLoadError as e:
                failures.append(str(e))

    reader = threading.Thread(target=read)
    # Switch threads as often as possible, so the reader runs between any two of the writer's
    # system calls (each releases the GIL).
    switch_interval_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        reader.start()
        for switch in range(SWITCHES):
            build(3 + switch % 2)
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(switch_interval_s)

    assert reads > SWITCHES
    assert failures == [], f"{len(failures)} of {reads} reads failed"


def test_a_load_reads_one_version_even_if_the_index_is_switched_meanwhile(
    index_dir: Path, build, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomsearch.index import store

    build(3)
    checksum = store.file_sha256
    switched = []

    def switch_then_checksum(path: Path) -> str:
        if not switched:
            switched.append(True)
            build(4)
        return checksum(path)

    monkeypatch.setattr(store, "file_sha256", switch_then_checksum)
    index = CatalogIndex.load(index_dir)
    assert switched and index.count == 3 and len(index.ids) == 3
    assert index.load_lexical().count == 3, "the lexical fields of the same version"
    assert count(index_dir) == 4


class FakeEncoder:
    fingerprint = "f" * 64
    dimension = 4

    def encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        return np.ones((len(texts), self.dimension), dtype=np.float32)


def test_an_interrupted_embedding_cache_write_leaves_no_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    texts = ["cordless drill", "claw hammer"]

    def save_half_then_interrupt(path: Path, array: np.ndarray) -> None:
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(FakeEncoder(), texts, max_tokens=8)
    monkeypatch.undo()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []

    # A file a killed process left half written is removed by the next write.
    path = cache.path(FakeEncoder.fingerprint, "digest", 8)
    abandoned = path.with_name(f"x-t8.{dead_pid()}.tmp.npy")
    abandoned.write_bytes(b"half")
    embeddings = cache.get_or_compute(FakeEncoder(), texts, max_tokens=8)
    assert embeddings.shape == (2, 4) and not abandoned.exists()
    assert [p.suffixes for p in path.parent.iterdir()] == [[".npy"]]
