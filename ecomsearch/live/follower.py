"""Following a catalog store's change log from a background thread.

Each `retrieve` and `select` instance (a process of its own) runs one ChangeFollower: it polls
the store for changes after the last one it read, every `interval_s`, and hands them over to be
applied under the model's lock, so a search never sees half of a batch. Polling (not
notifications) works the same for SQLite and PostgreSQL, and an idle poll is one indexed query.

Who applies: the follower thread, if the lock is free at once; otherwise the model, which calls
`drain()` with its lock held before each search. The follower never waits for the lock: under
a steady stream of requests the model thread releases and retakes it back to back, and a thread
blocked on a (not first-come-first-served) threading.Lock could wait for seconds. The first
version did, and searches under load missed writes acknowledged more than a second before.

A write acknowledged at time t is therefore applied by every instance by about
t + interval_s + the time to apply it; `ecomsearch bench-freshness` measures the lag under load.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# Changes applied per poll at most: bounds the time a search waits for the lock while an
# instance catches up on a large write.
POLL_BATCH_LIMIT = 1000
DEFAULT_POLL_INTERVAL_S = 0.05
# After a store error (unreachable PostgreSQL, a locked SQLite file), wait this long, doubling
# up to the maximum, before the next attempt: the instance keeps serving what it has.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0


def _seq(change: Any) -> int:
    return change.seq


class ChangeFollower:
    """Polls `store_url` for changes after `after_seq` and has `apply(changes)` called with
    `lock` held (see the module docstring); `on_poll(store)` (optional) runs after every poll,
    outside the lock, in the follower's thread, with the follower's own store connection."""

    def __init__(
        self,
        store_url: str,
        apply: Callable[[Sequence[Any]], Any],
        after_seq: int,
        lock: threading.Lock,
        interval_s: float = DEFAULT_POLL_INTERVAL_S,
        log: Callable[[str], None] = print,
        on_poll: Callable[[Any], None] | None = None,
        name: str = "catalog-follower",
        with_embeddings: bool = True,
    ) -> None:
        self.store_url = store_url
        self.apply = apply
        self.read_cursor = after_seq  # the last change read from the store
        self.cursor = after_seq  # the last change applied
        self.lock = lock
        self.interval_s = interval_s
        self.log = log
        self.on_poll = on_poll
        self.with_embeddings = with_embeddings  # `select` needs labels, not vectors
        self.last_poll_monotonic: float | None = None
        # Unix time of the start of the last poll that read everything the store held: every
        # change committed before it is read, and applied before the next search.
        self.caught_up_at: float | None = None
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()  # held for list operations only
        self._store: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ChangeFollower:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def store(self) -> Any:
        """This follower's store connection (opened on first use; the follower thread's)."""
        if self._store is None:
            from ecomsearch.store import open_store

            self._store = open_store(self.store_url)
        return self._store

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self, store: Any) -> int:
        """Reads the changes after the read cursor (at most POLL_BATCH_LIMIT) and applies them,
        with what was pending, if the lock is free; returns how many were read. Reading happens
        outside the lock: only applying blocks searches."""
        started_at = time.time()
        changes = store.changes(
            self.read_cursor, limit=POLL_BATCH_LIMIT, with_embeddings=self.with_embeddings
        )
        if changes:
            with self._pending_lock:
                self._pending.extend(changes)
                self.read_cursor = max(self.read_cursor, changes[-1].seq)
        self.apply_if_idle()
        self.last_poll_monotonic = time.monotonic()
        if len(changes) < POLL_BATCH_LIMIT:
            self.caught_up_at = started_at
        return len(changes)

    def apply_if_idle(self) -> None:
        """Applies what is pending if the lock is free now; the model does it otherwise."""
        if self._pending and self.lock.acquire(blocking=False):
            try:
                self.drain()
            finally:
                self.lock.release()

    def drain(self) -> int:
        """Applies the pending changes; the caller holds the lock. Returns how many."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending:
            # Two threads may have read overlapping ranges (select catches up from its request
            # thread) and handed them over in either order; each read holds a product's latest
            # state then, so in seq order the newest state of every product comes last.
            pending = sorted({change.seq: change for change in pending}.values(), key=_seq)
            try:
                self.apply(pending)  # idempotent: a change applied twice changes nothing
            except BaseException:
                # Read again from the last change applied: a failed batch is not skipped.
                with self._pending_lock:
                    self.read_cursor = min(self.read_cursor, self.cursor)
                raise
            self.cursor = max(self.cursor, pending[-1].seq)
        return len(pending)

    def catch_up(self, store: Any) -> int:
        """Reads until nothing is left (for a caller that must see every committed change,
        and then calls drain() under the lock). Returns how many changes were read."""
        total = 0
        while read := self.poll(store):
            total += read
            if read < POLL_BATCH_LIMIT:
                break
        return total

    def _run(self) -> None:
        retry_s = RETRY_INITIAL_S
        while not self._stop.is_set():
            try:
                read = self.poll(self.store())
                if self.on_poll is not None:
                    self.on_poll(self.store())
                retry_s = RETRY_INITIAL_S
            except Exception as e:  # keep following, whatever one poll hit
                self.log(f"catalog follower: {type(e).__name__}: {e}; retry in {retry_s:.1f} s")
                self._close_store()
                self._stop.wait(retry_s)
                retry_s = min(2 * retry_s, RETRY_MAX_S)
                continue
            if read < POLL_BATCH_LIMIT:  # a full batch: more may be waiting, go on at once
                self._stop.wait(self.interval_s)
        self._close_store()

    def _close_store(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._store.close()
            self._store = None
