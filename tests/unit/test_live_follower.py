"""Following the catalog store (ecomsearch.live.follower.ChangeFollower) with an in-memory
store, and the labels `select` keeps fresh with it (ecomsearch.live.labels.ProductLabels)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecomsearch.live import follower as follower_module
from ecomsearch.live.follower import ChangeFollower
from ecomsearch.live.labels import ProductLabels
from ecomsearch.store import ProductWrite, StoredProduct, StoreError
from tests.fakes.store import FakeStore

DIMENSION = 4


class FollowedStore(FakeStore):
    """The fake store, safe to write from the test while a follower thread reads (a database
    does that for the real ones), with reads that can fail (`fail_reads` of them) and a record
    of every read's cursor."""

    def __init__(self) -> None:
        super().__init__("encoder")
        self.fail_reads = 0
        self.reads: list[int] = []
        self._lock = threading.Lock()

    def changes(self, after_seq, limit=None, with_embeddings=True):
        with self._lock:
            if self.fail_reads:
                self.fail_reads -= 1
                raise StoreError("catalog store memory://fake: connection lost")
            self.reads.append(after_seq)
            return super().changes(after_seq, limit, with_embeddings)

    def put(self, *ids: str) -> None:
        writes = [ProductWrite(id=i, title=f"Product {i}") for i in ids]
        with self._lock:
            self.upsert(writes, np.ones((len(ids), DIMENSION), np.float32), "encoder")

    def remove(self, *ids: str) -> None:
        with self._lock:
            self.delete(ids)


class Applied:
    """An `apply` callback recording each call's changes, checking the lock is held."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.calls: list[list[int]] = []

    def __call__(self, changes) -> None:
        assert self.lock.locked(), "changes must be applied under the model's lock"
        self.calls.append([c.seq for c in changes])

    @property
    def seqs(self) -> list[int]:
        return [seq for call in self.calls for seq in call]


@pytest.fixture
def store() -> FollowedStore:
    return FollowedStore()


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


@pytest.fixture
def applied(lock) -> Applied:
    return Applied(lock)


def follower_of(applied: Applied, after_seq: int = 0, **kwargs) -> ChangeFollower:
    return ChangeFollower("memory://fake", applied, after_seq, applied.lock, **kwargs)


def test_a_poll_applies_the_new_changes_in_order(store, applied) -> None:
    store.put("a", "b", "c")
    follower = follower_of(applied, after_seq=1)

    assert follower.poll(store) == 2

    assert applied.calls == [[2, 3]]
    assert follower.cursor == follower.read_cursor == 3
    store.put("a")  # seq 4: a's new state
    assert follower.poll(store) == 1 and applied.calls == [[2, 3], [4]]
    assert store.reads == [1, 3]
    assert follower.poll(store) == 0 and len(applied.calls) == 2, "nothing new: no call"


def test_with_the_lock_taken_changes_wait_for_drain(store, lock, applied) -> None:
    """The follower never waits for the model's lock: it leaves the changes pending, and the
    model applies them (drain, lock held) before its next search."""
    store.put("a", "b")
    follower = follower_of(applied)
    with lock:
        assert follower.poll(store) == 2
        assert applied.calls == [] and follower.pending == 2
        assert follower.read_cursor == 2 and follower.cursor == 0
        assert follower.drain() == 2
    assert applied.calls == [[1, 2]] and follower.cursor == 2 and follower.pending == 0


def test_overlapping_reads_are_applied_once_each_in_seq_order(store, lock, applied) -> None:
    """Two threads may read overlapping ranges (select catches up from its request thread
    while its follower polls): every change is applied once, in seq order."""
    store.put("a", "b", "c")
    follower = follower_of(applied)
    with lock:
        follower.poll(store)  # 1..3
        store.put("d")
        follower.poll(store)  # 4
        follower.read_cursor = 1  # as if the other thread had read from 1
        follower.poll(store)  # 2..4 again
        follower.drain()
    assert applied.calls == [[1, 2, 3, 4]]


def test_the_cursor_only_moves_forward(store, applied) -> None:
    store.put("a", "b", "c")
    follower = follower_of(applied)
    follower.poll(store)
    stale = store.changes(0)[:1]  # a read that raced ahead of a slower one returns seq 1

    class Stale:
        def changes(self, after_seq, limit=None, with_embeddings=True):
            return stale

    follower.poll(Stale())
    assert follower.cursor == follower.read_cursor == 3


def test_catch_up_reads_until_the_store_has_nothing_more(
    store, applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follower_module, "POLL_BATCH_LIMIT", 2)
    store.put("a", "b", "c", "d", "e")
    follower = follower_of(applied)

    assert follower.catch_up(store) == 5

    assert applied.seqs == [1, 2, 3, 4, 5] and follower.cursor == 5
    assert store.reads == [0, 2, 4], "batches of POLL_BATCH_LIMIT, until a short one"


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the follower did not get there in time"
        time.sleep(0.005)


@pytest.fixture
def running(store, applied, monkeypatch: pytest.MonkeyPatch):
    """A started follower whose store connections are `store` (opens counted); stopped after
    the test."""
    opened: list[str] = []

    def open_store(url):
        opened.append(url)
        return store

    monkeypatch.setattr("ecomsearch.store.open_store", open_store)
    monkeypatch.setattr(follower_module, "RETRY_INITIAL_S", 0.01)
    logged: list[str] = []
    polled: list[object] = []
    follower = follower_of(
        applied, interval_s=0.005, log=logged.append, on_poll=polled.append
    ).start()
    yield follower, opened, logged, polled
    follower.stop()


def test_the_thread_follows_writes_as_they_come(running, store, applied) -> None:
    follower, opened, _, polled = running
    store.put("a")
    wait_until(lambda: follower.cursor == 1)
    store.put("b", "c")
    store.remove("a")
    wait_until(lambda: follower.cursor == 4)
    assert applied.seqs == [1, 2, 3, 4]
    assert opened == ["memory://fake"] and polled and all(p is store for p in polled)


def test_the_thread_keeps_following_after_a_store_error(running, store, applied) -> None:
    follower, opened, logged, _ = running
    store.put("a")
    wait_until(lambda: follower.cursor == 1)
    with store._lock:
        store.fail_reads = 1
    store.put("b")
    wait_until(lambda: follower.cursor == 2)
    assert applied.seqs == [1, 2]
    assert any("StoreError" in message and "connection lost" in message for message in logged)
    assert len(opened) == 2, "the broken connection is closed and a new one opened"
    assert store.closed


def test_stop_joins_the_thread(running) -> None:
    follower, *_ = running
    thread = follower._thread
    assert thread.is_alive()
    follower.stop()
    assert not thread.is_alive()


# --- ProductLabels ---------------------------------------------------------------------------


def stored(key: int, seq: int, deleted: bool = False, **fields) -> StoredProduct:
    values = {"title": f"Product {key}", "price": 2.5 * key, "in_stock": key % 2 == 0} | fields
    return StoredProduct(key=key, id=f"sku-{key}", seq=seq, deleted=deleted, **values)


def test_labels_of_a_snapshot() -> None:
    labels = ProductLabels(capacity=2)
    labels.load(7, [stored(1, 3), stored(4, 7, price=None, title="Café mug")])

    keys = np.array([[4, -1], [1, 2]])
    out = labels.labels(keys)

    assert labels.applied_seq == 7 and labels.live_count == 2 and labels.capacity >= 5
    assert out["ids"].tolist() == [[b"sku-4", b""], [b"sku-1", b""]]
    assert out["titles"].tolist() == [["Café mug".encode(), b""], [b"Product 1", b""]]
    assert out["prices"].dtype == np.float32
    np.testing.assert_array_equal(out["prices"], [[np.nan, np.nan], [2.5, np.nan]])
    assert out["in_stock"].tolist() == [[True, False], [False, False]]
    assert labels.live(keys).tolist() == [[True, False], [True, False]]


def test_changes_update_delete_and_bring_back() -> None:
    labels = ProductLabels(capacity=4)
    labels.load(2, [stored(1, 1), stored(2, 2)])

    assert labels.apply([stored(1, 3, price=9.0), stored(2, 4, deleted=True)]) == 2
    assert labels.labels(np.array([1]))["prices"].tolist() == [9.0]
    assert labels.live(np.array([1, 2])).tolist() == [True, False]
    assert labels.known(np.array([2])).tolist() == [True], "a deleted key is known, not live"
    deleted = labels.labels(np.array([2]))
    assert deleted["ids"].tolist() == [b""] and np.isnan(deleted["prices"][0])
    assert labels.live_count == 1

    assert labels.apply([stored(2, 5, title="Back again")]) == 1
    assert labels.labels(np.array([2]))["titles"].tolist() == [b"Back again"]
    assert labels.applied_seq == 5


def test_changes_already_applied_are_skipped() -> None:
    labels = ProductLabels()
    labels.load(5, [stored(1, 5)])
    assert labels.apply([stored(1, 4, title="older"), stored(1, 5, title="same")]) == 0
    assert labels.labels(np.array([1]))["titles"].tolist() == [b"Product 1"]


def test_a_key_beyond_the_capacity_grows_the_table() -> None:
    labels = ProductLabels(capacity=2)
    labels.load(1, [stored(1, 1)])
    labels.apply([stored(5000, 2)])
    assert labels.capacity > 5000
    assert labels.labels(np.array([1, 5000]))["ids"].tolist() == [b"sku-1", b"sku-5000"]


def test_known_means_ever_seen_and_padding_is_known() -> None:
    labels = ProductLabels(capacity=8)
    labels.load(1, [stored(3, 1)])
    keys = np.array([3, -1, 4, -2, 8, 10**12, -(2**62)])
    assert labels.known(keys).tolist() == [True, True, False, False, False, False, False]
    assert labels.live(keys).tolist() == [True, False, False, False, False, False, False]


def test_labels_of_a_static_index() -> None:
    metadata = [
        {"id": "a", "title": "Drill", "price": 3.5},
        {"id": "b", "title": "Saw", "in_stock": False},
    ]
    labels = ProductLabels.from_index(np.array([7, 2]), metadata)
    out = labels.labels(np.array([2, 7, -1]))
    assert out["ids"].tolist() == [b"b", b"a", b""]
    np.testing.assert_array_equal(out["prices"], [np.nan, 3.5, np.nan])
    assert out["in_stock"].tolist() == [False, True, False]


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.booleans(), st.one_of(st.none(), st.floats(0, 99))),
        max_size=30,
    ),
    st.lists(st.integers(1, 4), min_size=1, max_size=6),
)
def test_labels_follow_any_change_sequence(ops, cuts) -> None:
    """Changes applied in batches of any size leave exactly the last state of every key."""
    labels, expected = ProductLabels(capacity=1), {}
    changes = [
        stored(key, seq, deleted=deleted, price=price)
        for seq, (key, deleted, price) in enumerate(ops, start=1)
    ]
    sizes, start = itertools.cycle(cuts), 0
    while start < len(changes):
        size = next(sizes)
        labels.apply(changes[start : start + size])
        start += size
    for change in changes:
        expected[change.key] = change
    keys = np.arange(45)
    out = labels.labels(keys)
    for key in keys.tolist():
        change = expected.get(key)
        if change is None or change.deleted:
            assert out["ids"][key] == b"" and not out["in_stock"][key]
            assert labels.known(np.array([key]))[0] == (change is not None)
            continue
        assert out["ids"][key] == change.id.encode()
        want = np.nan if change.price is None else np.float32(change.price)
        np.testing.assert_array_equal(out["prices"][key], want)
        assert out["in_stock"][key] == change.in_stock


def test_a_tombstone_keeps_its_key_known_even_without_a_title() -> None:
    labels = ProductLabels()
    labels.apply([replace(stored(1, 1), deleted=True, title="")])
    assert labels.known(np.array([1])).tolist() == [True]
    assert labels.live(np.array([1])).tolist() == [False]


def test_caught_up_is_the_start_of_the_last_poll_that_read_everything(
    store, applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follower_module, "POLL_BATCH_LIMIT", 2)
    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr(follower_module.time, "time", lambda: next(clock))
    store.put("a", "b", "c")
    follower = follower_of(applied)
    assert follower.caught_up_at is None

    assert follower.poll(store) == 2  # a full batch: more may be waiting
    assert follower.caught_up_at is None
    assert follower.poll(store) == 1  # short: everything committed before 101.0 is read
    assert follower.caught_up_at == 101.0
    assert follower.poll(store) == 0
    assert follower.caught_up_at == 102.0
