"""The event log's contract, checked the same way against SQLite and a real PostgreSQL.

The writer processes of the concurrency test run this file as a script
(`python test_store_events.py writer ...`), so their code sits beside the test reading their
output."""

from __future__ import annotations

import contextlib
import itertools
import pickle
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.store import (
    CatalogStore,
    Event,
    EventLog,
    EventsResult,
    ProductWrite,
    UnknownProductsError,
    open_store,
)

DIMENSION = 4
FINGERPRINT = "encoder-a"
BACKENDS = ("sqlite", "postgres")
T0 = 1_700_000_000.0


def add_products(store: CatalogStore, *ids: str) -> dict[str, int]:
    """Upserts products `ids`; returns their keys by id."""
    written = [ProductWrite(id=product_id, title=f"Product {product_id}") for product_id in ids]
    result = store.upsert(written, np.ones((len(ids), DIMENSION), np.float32), FINGERPRINT)
    return dict(zip(ids, result.keys, strict=True))


def event(product_id: str = "a", user_id: str = "u1", kind: str = "view", **fields: Any) -> Event:
    return Event(user_id=user_id, product_id=product_id, kind=kind, timestamp_s=T0, **fields)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'stores' / 'catalog.sqlite3'}"
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def store(store_url: str) -> Iterator[CatalogStore]:
    with open_store(store_url) as opened:
        yield opened


def raw_execute(url: str, statement: str) -> None:
    """Runs one statement on a store's database behind its back. Write the SQLite table names
    (`meta`, `events`): PostgreSQL's are prefixed `ecomsearch_`."""
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db, db:
            db.execute(statement)
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        for table in ("meta", "events"):
            statement = statement.replace(f" {table}", f" ecomsearch_{table}")
        db.execute(statement)


def assert_log_is_empty_after(store: CatalogStore, head: int) -> None:
    assert store.events_head() == head
    assert len(store.events(0)) == head and len(store.events(head)) == 0


# Round trips.


def test_every_field_round_trips(store: CatalogStore) -> None:
    keys = add_products(store, "sku-1", "sku-2")
    written = [
        Event("shopper-1", "sku-1", "view", T0 + 0.125),
        Event("Zoë ☕ 42", "sku-2", "cart", 0.0, quantity=3),
        Event("x" * contract.MAX_USER_ID_BYTES, "sku-1", "purchase", 1e10 / 3, 1_000_000),
        # numpy scalars are fine: a writer decoding tensors hands them over as they come.
        Event("shopper-1", "sku-2", "view", np.float64(T0 + 1), quantity=np.int32(2)),  # type: ignore[arg-type]
    ]
    result = store.record_events(written)
    assert result == EventsResult(first_seq=1, last_seq=4, recorded=4)
    log = store.events(0)
    assert len(log) == 4
    np.testing.assert_array_equal(log.seqs, [1, 2, 3, 4])
    assert log.user_ids == [e.user_id for e in written]
    assert log.product_ids == [e.product_id for e in written]
    np.testing.assert_array_equal(log.product_keys, [keys[e.product_id] for e in written])
    np.testing.assert_array_equal(log.kinds, [0, 1, 2, 0])
    assert [contract.EVENT_KINDS[k] for k in log.kinds] == [e.kind for e in written]
    np.testing.assert_array_equal(log.quantities, [1, 3, 1_000_000, 2])
    # Bit for bit: a timestamp is stored as a double.
    assert log.timestamps_s.tobytes() == np.array([e.timestamp_s for e in written]).tobytes()
    assert [log.seqs.dtype, log.product_keys.dtype, log.kinds.dtype] == [
        np.int64,
        np.int64,
        np.int8,
    ]
    assert (log.quantities.dtype, log.timestamps_s.dtype) == (np.int32, np.float64)
    assert store.events(0) == log  # equality by value


def test_a_new_store_has_an_empty_log(store: CatalogStore) -> None:
    assert store.events_head() == 0
    log = store.events(0)
    assert len(log) == 0 and log == EventLog.empty()
    assert log.seqs.dtype == np.int64 and log.kinds.dtype == np.int8
    assert store.record_events([]) == EventsResult(first_seq=None, last_seq=None, recorded=0)
    assert store.events_head() == 0 and store.head() == 0


def test_event_seqs_are_consecutive_and_apart_from_the_catalog_seqs(store: CatalogStore) -> None:
    add_products(store, "a", "b", "c")  # catalog seqs 1..3
    first = store.record_events([event("a"), event("b")])
    assert (first.first_seq, first.last_seq, first.recorded) == (1, 2, 2)
    add_products(store, "d")  # catalog seq 4
    second = store.record_events([event("d"), event("a"), event("c")])
    assert (second.first_seq, second.last_seq, second.recorded) == (3, 5, 3)
    # Input order within a write; neither counter moves the other.
    assert store.events(0).product_ids == ["a", "b", "d", "a", "c"]
    assert (store.head(), store.events_head()) == (4, 5)
    assert [p.seq for p in store.changes(0)] == [1, 2, 3, 4]


# Refusals: all or nothing.

BAD_EVENTS: list[tuple[dict[str, Any], str]] = [
    ({"user_id": ""}, "user_id must be a non-empty string"),
    ({"user_id": None}, "user_id must be a non-empty string"),
    ({"user_id": 7}, "user_id must be a non-empty string"),
    ({"user_id": " \t\n"}, "no visible characters"),
    ({"user_id": "\u200b\u200d"}, "no visible characters"),  # zero-width space and joiner
    ({"user_id": "u\x00"}, "contains NUL"),
    ({"user_id": "\udc80"}, "not valid Unicode"),
    ({"user_id": "x" * (contract.MAX_USER_ID_BYTES + 1)}, "257 bytes"),
    ({"user_id": "é" * 129}, "258 bytes"),  # 129 characters, two bytes each
    ({"product_id": ""}, "product_id must be a non-empty string"),
    ({"product_id": 1}, "product_id must be a non-empty string"),
    ({"product_id": "a\x00"}, "contains NUL"),
    ({"kind": "click"}, "kind 'click' is not one of view, cart, purchase"),
    ({"kind": "View"}, "is not one of"),
    ({"kind": 0}, "is not one of"),
    ({"quantity": 0}, "not between 1 and"),
    ({"quantity": -1}, "not between 1 and"),
    ({"quantity": contract.MAX_EVENT_QUANTITY + 1}, "not between 1 and"),
    ({"quantity": True}, "must be an int"),
    ({"quantity": 1.0}, "must be an int"),
    ({"quantity": "1"}, "must be an int"),
    ({"timestamp_s": -0.5}, "must be finite and >= 0"),
    ({"timestamp_s": float("nan")}, "must be finite and >= 0"),
    ({"timestamp_s": float("inf")}, "must be finite and >= 0"),
    ({"timestamp_s": 10**400}, "not finite"),
    ({"timestamp_s": "1700000000"}, "must be a number of seconds"),
    ({"timestamp_s": None}, "must be a number of seconds"),
    ({"timestamp_s": True}, "must be a number of seconds"),
]


def test_a_bad_event_writes_nothing(store: CatalogStore) -> None:
    add_products(store, "a", "b")
    store.record_events([event("a")])
    good = [event("a"), event("b", kind="cart"), event("a", kind="purchase", quantity=2)]
    for bad_fields, message in BAD_EVENTS:
        fields = {"user_id": "u2", "product_id": "b", "kind": "view", "timestamp_s": T0}
        bad = Event(**{**fields, **bad_fields})
        with pytest.raises(ValueError, match=f"event 2: .*{message}") as error:
            store.record_events([*good[:2], bad, good[2]])
        assert not isinstance(error.value, UnknownProductsError)
        assert_log_is_empty_after(store, 1)
    with pytest.raises(ValueError, match="event 1 is a tuple, not an Event"):
        store.record_events([good[0], ("u", "a", "view", T0, 1)])  # type: ignore[list-item]
    assert_log_is_empty_after(store, 1)
    # The store is still usable, and the refused writes used up no seq.
    assert store.record_events(good).first_seq == 2


def test_events_of_products_not_in_the_live_catalog_write_nothing(store: CatalogStore) -> None:
    add_products(store, "a", "b", "c")
    store.delete(["b"])
    with pytest.raises(UnknownProductsError) as error:
        store.record_events(
            [event("a"), event("x"), event("b"), event("x"), event("c"), event("y")]
        )
    assert error.value.ids == ["x", "b", "y"]  # distinct, in order
    assert isinstance(error.value, ValueError)
    assert store.url in str(error.value) and "'x', 'b', 'y'" in str(error.value)
    # It crosses a process boundary intact (a worker's error reported by its parent).
    assert pickle.loads(pickle.dumps(error.value)).ids == ["x", "b", "y"]
    assert_log_is_empty_after(store, 0)


def test_a_deleted_product_is_accepted_again_once_revived(store: CatalogStore) -> None:
    key = add_products(store, "a")["a"]
    store.record_events([event("a")])
    store.delete(["a"])
    with pytest.raises(UnknownProductsError):
        store.record_events([event("a", kind="cart")])
    assert add_products(store, "a") == {"a": key}
    assert store.record_events([event("a", kind="purchase")]).first_seq == 2
    log = store.events(0)
    np.testing.assert_array_equal(log.product_keys, [key, key])
    np.testing.assert_array_equal(log.kinds, [0, 2])


def test_a_failure_after_the_rows_are_written_writes_nothing(
    store: CatalogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected into the last step of a write (recording the counter), after every row."""
    add_products(store, "a")
    store.record_events([event("a")])

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(type(store), "_set", staticmethod(fail))
    with pytest.raises(RuntimeError, match="injected"):
        store.record_events([event("a")] * 100)
    monkeypatch.undo()
    assert_log_is_empty_after(store, 1)
    assert store.record_events([event("a")]).first_seq == 2


# Reading the log.


def test_events_pages_by_seq(store: CatalogStore) -> None:
    add_products(store, "a", "b")
    for write in range(3):
        store.record_events(
            [Event(f"u{write}", "ab"[i % 2], "view", T0 + 10 * write + i) for i in range(4)]
        )
    assert store.events_head() == 12
    page = store.events(3, limit=4)
    np.testing.assert_array_equal(page.seqs, [4, 5, 6, 7])  # across writes
    assert page.user_ids == ["u0", "u1", "u1", "u1"]
    np.testing.assert_array_equal(page.timestamps_s, [T0 + 3, T0 + 10, T0 + 11, T0 + 12])
    assert len(store.events(12)) == 0 and len(store.events(99)) == 0
    assert len(store.events(0, limit=0)) == 0
    np.testing.assert_array_equal(store.events(10).seqs, [11, 12])
    with pytest.raises(ValueError, match="limit"):
        store.events(0, limit=-1)
    # A follower paging with a limit sees every event once, in order.
    seqs, users, cursor = [], [], 0
    while len(page := store.events(cursor, limit=5)):
        seqs += page.seqs.tolist()
        users += page.user_ids
        cursor = int(page.seqs[-1])
    assert users == store.events(0).user_ids
    assert seqs == list(range(1, 13))


def test_a_bulk_load_round_trips(store: CatalogStore) -> None:
    rng = np.random.default_rng(0)
    ids = [f"sku-{i}" for i in range(300)]
    keys = add_products(store, *ids)
    n = 50_000
    products = rng.integers(0, len(ids), n)
    users = rng.integers(0, 5_000, n)
    kinds = rng.integers(0, len(contract.EVENT_KINDS), n)
    quantities = rng.integers(1, 10, n)
    times = T0 + np.sort(rng.uniform(0, 86_400, n))
    result = store.record_events(
        [
            Event(f"user-{u}", ids[p], contract.EVENT_KINDS[k], float(t), int(q))
            for u, p, k, q, t in zip(users, products, kinds, quantities, times, strict=True)
        ]
    )
    assert (result.first_seq, result.last_seq, result.recorded) == (1, n, n)
    log = store.events(0)
    np.testing.assert_array_equal(log.seqs, np.arange(1, n + 1))
    assert log.user_ids == [f"user-{u}" for u in users]
    assert log.product_ids == [ids[p] for p in products]
    np.testing.assert_array_equal(log.product_keys, [keys[ids[p]] for p in products])
    np.testing.assert_array_equal(log.kinds, kinds)
    np.testing.assert_array_equal(log.quantities, quantities)
    np.testing.assert_array_equal(log.timestamps_s, times)
    # Polling an idle log is an indexed read at its end, not a scan of it.
    polls = []
    for _ in range(200):
        start = time.perf_counter()
        assert len(store.events(n)) == 0
        polls.append(time.perf_counter() - start)
    limit_s = 0.0005 if store.url.startswith("sqlite:") else 0.005
    assert statistics.median(polls) < limit_s, f"an idle poll took {statistics.median(polls)}s"


# Schema and reopening.


def test_the_log_survives_reopening(store_url: str) -> None:
    with open_store(store_url) as store:
        add_products(store, "a")
        store.record_events([event("a"), event("a", kind="cart")])
        before = store.events(0)
    with open_store(store_url) as reopened:
        assert reopened.events_head() == 2 and reopened.events(0) == before
        assert reopened.record_events([event("a")]).first_seq == 3
        with pytest.raises(ValueError, match="store's own"):
            reopened.set_meta("last_event_seq", "0")


def test_a_store_made_before_the_log_gains_it_on_opening(store_url: str) -> None:
    """A store as an ecomsearch without the event log made it: no events table, no counter.
    Opening it adds them, and the catalog is untouched."""
    with open_store(store_url) as store:
        keys = add_products(store, "a", "b")
        catalog = store.snapshot()
    raw_execute(store_url, "DROP TABLE events")
    raw_execute(store_url, "DELETE FROM meta WHERE name = 'last_event_seq'")
    with open_store(store_url) as store:
        assert store.snapshot() == catalog and store.events_head() == 0
        assert len(store.events(0)) == 0
        assert store.record_events([event("b"), event("a")]) == EventsResult(1, 2, 2)
        np.testing.assert_array_equal(store.events(0).product_keys, [keys["b"], keys["a"]])
    # A log lost behind the store's back keeps its counter: seqs never go back.
    raw_execute(store_url, "DROP TABLE events")
    with open_store(store_url) as store:
        assert store.events_head() == 2
        assert store.record_events([event("a")]).first_seq == 3


# Several processes.

WRITERS = 3
WRITES_PER_WRITER = 200


def test_a_follower_sees_every_event_while_processes_write(store_url: str) -> None:
    """Writers record small batches of events at once (and now and then write the catalog,
    whose writes share a lock with them in SQLite), while a follower polls
    events(after_seq=cursor), moving its cursor to the last seq it saw. If an event could commit
    after one with a higher seq, the follower would skip it for good."""
    with open_store(store_url) as follower:
        add_products(follower, *(f"p{i}" for i in range(10)))
        writers = [
            subprocess.Popen(
                [sys.executable, __file__, "writer", store_url, str(w), str(WRITES_PER_WRITER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(WRITERS)
        ]
        try:
            # Every writer has opened the store; start them together.
            for w in writers:
                assert w.stdout is not None and w.stdin is not None
                assert w.stdout.readline() == "ready\n", w.communicate()[1]
            for w in writers:
                w.stdin.write("go\n")
                w.stdin.flush()
            pages: list[EventLog] = []
            cursor = 0
            while True:
                writing = any(w.poll() is None for w in writers)
                page = follower.events(cursor)
                if len(page):
                    pages.append(page)
                    cursor = int(page.seqs[-1])
                elif not writing:
                    break
                time.sleep(0.001)
            outputs = [w.communicate(timeout=30) for w in writers]
            for w, (_, errors) in zip(writers, outputs, strict=True):
                assert w.returncode == 0, errors
            head = follower.events_head()
            everything = follower.events(0)
        finally:
            for w in writers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
    assert len(pages) > 10, "the follower did not poll while the writers wrote"
    seqs = [seq for page in pages for seq in page.seqs.tolist()]
    recorded = sum(int(out.split()[-1]) for out, _ in outputs)
    # Every event seen once, in seq order, with no seq skipped.
    assert seqs == list(range(1, head + 1)) and head == recorded
    users = [user for page in pages for user in page.user_ids]
    assert users == everything.user_ids
    switches = sum(a != b for a, b in itertools.pairwise(users))
    assert switches > 20, "the writers did not write at the same time"
    # Each writer's events in the order it recorded them (its counter is in timestamp_s).
    times = np.concatenate([page.timestamps_s for page in pages])
    for w in range(WRITERS):
        mine = times[np.array(users) == f"w{w}"]
        np.testing.assert_array_equal(mine, T0 + np.arange(len(mine)))


# The writer processes.


def write_concurrently(url: str, writer: int, writes: int) -> None:
    """Once told to go, records small batches of events (every tenth write also upserts a
    product); prints how many events it recorded."""
    rng = np.random.default_rng(writer)
    recorded = 0
    with open_store(url) as store:
        print("ready", flush=True)
        sys.stdin.readline()  # the test starts every writer at once
        for write in range(writes):
            batch = [
                Event(f"w{writer}", f"p{rng.integers(10)}", "view", T0 + recorded + i)
                for i in range(int(rng.integers(1, 4)))
            ]
            recorded += store.record_events(batch).recorded
            if write % 10 == 0:
                add_products(store, f"p{rng.integers(10)}")
            # A pause between writes, as a real writer has: SQLite's busy handler polls, so
            # without one the writer holding the lock would starve the others.
            time.sleep(0.002)
    print(recorded)


if __name__ == "__main__":
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "writer":
        write_concurrently(arguments[0], int(arguments[1]), int(arguments[2]))
    else:
        raise SystemExit(f"unknown role {role!r}")
