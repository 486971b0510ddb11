"""Keeping one process's retriever live: follow the store, switch to compacted bases, and start
a compaction when the delta has grown past its threshold.

Used by each `retrieve` instance; everything runs in the follower's thread except the swaps,
which take the model's lock (held by `retrieve` around every search).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ecomsearch.index.atomic import current_version
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.compaction import compact, compaction_lock
from ecomsearch.live.follower import DEFAULT_POLL_INTERVAL_S, ChangeFollower
from ecomsearch.ranking.candidates import HybridRetriever

# Compact when the delta holds this many rows (superseded ones included: they cost search time
# too), or this share of the base, whichever is larger: the delta is searched exactly and
# scored with the base's BM25 statistics, so it must stay small next to the base.
COMPACT_DELTA_ROWS = 5000
COMPACT_DELTA_SHARE = 0.05
# How often the follower looks for a new base version (a stat of the `index` link).
VERSION_CHECK_INTERVAL_S = 0.5


def compaction_threshold(base_count: int, rows: int = COMPACT_DELTA_ROWS) -> int:
    return max(rows, int(COMPACT_DELTA_SHARE * base_count))


class LiveRetriever:
    """Follows `store_url` for `retriever`, whose catalog was loaded from `index_dir`."""

    def __init__(
        self,
        retriever: HybridRetriever,
        index_dir: Path,
        store_url: str,
        lock: threading.Lock,
        log: Callable[[str], None],
        load_base: Callable[[Path], CatalogIndex],
        warn: Callable[[str], None] | None = None,
        interval_s: float = DEFAULT_POLL_INTERVAL_S,
        compact_delta_rows: int = COMPACT_DELTA_ROWS,
        name: str = "retrieve",
    ) -> None:
        self.retriever = retriever
        self.name = name  # whose catalog this is, in logs and thread names
        self.index_dir = index_dir
        self.store_url = store_url
        self.lock = lock
        self.log = log  # what happened (switches, compactions)
        self.warn = warn or log  # what went wrong
        # Loads (and for GPU instances, places) a base index version: the model's own recipe.
        self.load_base = load_base
        self.compact_delta_rows = compact_delta_rows
        self._next_version_check = 0.0
        self._compaction: threading.Thread | None = None
        # A catalog loaded from a new base version and brought up to date, waiting to be
        # swapped in under the lock (by `drain`, like pending changes).
        self._ready: LiveCatalog | None = None
        self.follower = ChangeFollower(
            store_url,
            self._apply,
            retriever.catalog.applied_seq,
            lock,
            interval_s,
            self.warn,
            on_poll=self._after_poll,
            name=f"{name}-follower",
        )

    def check_store(self) -> None:
        """Raises RuntimeError when the store is not the one the served index was built from
        (its changes would be applied to the wrong catalog's rows)."""
        manifest = self.retriever.catalog.base.manifest
        store = self.follower.store()
        if manifest.catalog_store_id not in (None, store.store_id):
            raise RuntimeError(
                f"the served index was built from the catalog store {manifest.catalog_store} "
                f"(id {manifest.catalog_store_id}), but {store.url} is another store "
                f"(id {store.store_id}); rebuild the index from it with `ecomsearch build-index`"
            )

    def start(self) -> LiveRetriever:
        self.follower.start()
        return self

    def catch_up_and_start(self) -> LiveRetriever:
        """Checks the store, brings the catalog to the store's state now (before the model
        reports ready), then follows it in the background."""
        self.check_store()
        self.follower.catch_up(self.follower.store())
        with self.lock:
            self.drain()
        return self.start()

    def stop(self) -> None:
        self.follower.stop()
        if self._compaction is not None:
            self._compaction.join(60)

    def _apply(self, changes) -> None:
        self.retriever.catalog.apply(changes)

    def drain(self) -> None:
        """Brings the served catalog up to date with what the follower has read: the caller
        (the model, before a search) holds the lock."""
        ready, self._ready = self._ready, None
        if ready is not None:
            old = self.retriever.catalog
            self.retriever.catalog = ready
            self.log(
                f"{self.name}: switched to {ready.version_dir.name} ({ready.base_count} products "
                f"at change {ready.base.manifest.catalog_seq}, delta {old.delta_rows} -> "
                f"{ready.delta_rows} rows)"
            )
        self.follower.drain()

    def _after_poll(self, store: Any) -> None:
        now = time.monotonic()
        if now >= self._next_version_check:
            self._next_version_check = now + VERSION_CHECK_INTERVAL_S
            version = current_version(self.index_dir)
            served = (self._ready or self.retriever.catalog).version_dir
            if version is not None and version.resolve() != served:
                self.switch_base(store)
        catalog = self.retriever.catalog
        threshold = compaction_threshold(catalog.base_count, self.compact_delta_rows)
        if catalog.delta_rows >= threshold and (
            self._compaction is None or not self._compaction.is_alive()
        ):
            self._compaction = threading.Thread(
                target=self._compact, name=f"{self.name}-compaction", daemon=True
            )
            self._compaction.start()

    def switch_base(self, store: Any) -> None:
        """Loads the index version `index_dir` links to now and brings it up to date with
        everything the follower has read (in the follower's thread, which alone reads), then
        has it swapped in under the lock; the old catalog serves until then."""
        started = time.perf_counter()
        catalog = LiveCatalog.load(self.load_base(self.index_dir))
        if catalog.base.manifest.catalog_store_id not in (None, store.store_id):
            self.warn(
                f"{self.name}: {catalog.version_dir} was built from another store; not served"
            )
            return
        # Changes the old catalog was given are all <= read_cursor: the new one gets them
        # here, the pending ones (applied to whichever catalog is served) at the swap.
        while catalog.applied_seq < self.follower.read_cursor and (
            changes := store.changes(catalog.applied_seq, limit=1000, with_embeddings=True)
        ):
            catalog.apply(changes)
        self._ready = catalog
        self.log(
            f"{self.name}: loaded {catalog.version_dir.name} in "
            f"{time.perf_counter() - started:.2f} s; switching at the next search"
        )
        if self.lock.acquire(blocking=False):
            try:
                self.drain()
            finally:
                self.lock.release()

    def _compact(self) -> None:
        # One instance compacts; the others find the lock taken and go on serving. All of them
        # switch when they see the new version.
        try:
            with compaction_lock(self.index_dir, wait=False) as locked:
                if not locked:
                    return
                catalog = self.retriever.catalog
                version = current_version(self.index_dir)
                if version is not None and version.resolve() != catalog.version_dir:
                    return  # another process compacted; the next poll switches to it
                if catalog.delta_rows < compaction_threshold(
                    catalog.base_count, self.compact_delta_rows
                ):
                    return  # another instance compacted while this one waited
                started = time.perf_counter()
                manifest = compact(self.index_dir, self.store_url)
                self.log(
                    f"{self.name}: compacted {manifest.count} products at change "
                    f"{manifest.catalog_seq} in {time.perf_counter() - started:.1f} s"
                )
        except Exception as e:
            self.warn(f"{self.name}: compaction failed: {type(e).__name__}: {e}")
