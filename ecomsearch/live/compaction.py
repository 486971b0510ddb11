"""Compaction: a new base index from the catalog store, switched in without a pause.

The delta (ecomsearch.live.catalog) is searched exactly and its BM25 uses the base's statistics,
so it must stay small. When it passes a threshold (or on `ecomsearch catalog compact`), one
process rebuilds the base from a store snapshot (embeddings come from the store: no encoder
run), writes it aside and switches the repository's `index` link to it in one rename
(ecomsearch.index.atomic). Every `retrieve` instance notices the new version, loads it in its
follower thread while it keeps serving the old one, applies the changes made since the
snapshot, and swaps it in under its lock: no search fails or comes back empty.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ecomsearch.index.builder import EXACT_SEARCH_MAX_PRODUCTS, store_snapshot, write_index
from ecomsearch.index.manifest import IndexManifest

log = logging.getLogger(__name__)


@contextmanager
def compaction_lock(index_dir: Path, wait: bool = True) -> Iterator[bool]:
    """One compaction of an index at a time, across processes; yields False (without the
    lock) when `wait` is False and another process holds it."""
    path = index_dir.with_name(f".{index_dir.name}.compact.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True  # released when the file is closed


def compact(
    index_dir: Path,
    store_url: str,
    exact_max_products: int | None = None,
) -> IndexManifest:
    """Rebuilds the index at `index_dir` from the store's current catalog and publishes it;
    returns the new manifest. The caller holds compaction_lock. By default an approximate
    (HNSW) index stays one, and an exact one turns approximate past the usual size."""
    from ecomsearch.store import open_store

    current = IndexManifest.read(index_dir)
    if exact_max_products is None:
        hnsw = current.index_type == "hnsw"
        exact_max_products = 0 if hnsw else EXACT_SEARCH_MAX_PRODUCTS
    with open_store(store_url) as store:
        if current.catalog_store_id not in (None, store.store_id):
            raise RuntimeError(
                f"the index at {index_dir} was built from another catalog store "
                f"({current.catalog_store}) than {store.url}"
            )
        snapshot = store_snapshot(store, current.catalog_sha256)
    log.info(
        "compacting %s: %d products at change %s (base was at %s), pid %d",
        index_dir,
        len(snapshot.products),
        snapshot.seq,
        current.catalog_seq,
        os.getpid(),
    )
    return write_index(index_dir, snapshot, exact_max_products)
