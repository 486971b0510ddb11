"""The catalog store's contract, checked the same way against SQLite and a real PostgreSQL.

The writer processes of the concurrency and kill -9 tests run this file as a script
(`python test_store.py writer|acknowledger ...`), so their code sits beside the tests reading
their output."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch.store import (
    CatalogStore,
    ProductWrite,
    StoredProduct,
    StoreError,
    open_store,
    redact,
)
from ecomsearch.store.sqlite import SqliteStore

DIMENSION = 8
FINGERPRINT = "encoder-a"
BACKENDS = ("sqlite", "postgres")


def vectors(rows: int, seed: int = 0, dimension: int = DIMENSION) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, dimension)).astype(np.float32)


def product(product_id: str, title: str | None = None, **fields: Any) -> ProductWrite:
    return ProductWrite(id=product_id, title=title or f"Product {product_id}", **fields)


def products(*ids: str) -> list[ProductWrite]:
    return [product(product_id) for product_id in ids]


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
    """Runs one statement on a store's database behind its back. Write `meta` for the meta
    table: it is `ecomsearch_meta` in PostgreSQL."""
    if url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db, db:
            db.execute(statement)
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(statement.replace("meta", "ecomsearch_meta"))


# Round trips.


def test_every_field_round_trips(store: CatalogStore) -> None:
    written = [
        ProductWrite(
            id="sku-1",
            title="Café mug ☕",
            brand="Acme",
            category_path=("Kitchen", "Mugs & cups"),
            description="Holds 350 ml.\nDishwasher safe.",
            price=12.5,
            in_stock=False,
            attributes={"colour": "blue", "sizes": [1, 2.5], "nested": {"a": None, "b": True}},
        ),
        ProductWrite(id="sku-2", title="No price", price=None),
    ]
    embeddings = vectors(2)
    result = store.upsert(written, embeddings, FINGERPRINT)
    got = store.get(["sku-1", "sku-2", "unknown"], with_embeddings=True)
    assert set(got) == {"sku-1", "sku-2"}
    for row, (source, key, seq) in enumerate(
        zip(written, result.keys, range(result.first_seq, result.last_seq + 1), strict=True)
    ):
        stored = got[source.id]
        assert stored == StoredProduct(
            key=key,
            id=source.id,
            seq=seq,
            deleted=False,
            title=source.title,
            brand=source.brand,
            category_path=source.category_path,
            description=source.description,
            price=source.price,
            in_stock=source.in_stock,
            attributes=source.attributes,
            embedding=embeddings[row],
        )
        assert stored.embedding.dtype == np.float32
        assert stored.embedding.tobytes() == embeddings[row].tobytes()  # bit for bit
    assert got["sku-2"].price is None
    without = store.get(["sku-1"])["sku-1"]
    assert without.embedding is None and without.title == "Café mug ☕"
    assert store.encoder_fingerprint == FINGERPRINT and store.dimension == DIMENSION


def test_a_new_store_is_empty(store: CatalogStore) -> None:
    assert store.head() == 0
    assert store.count() == 0
    assert store.changes(0) == []
    assert store.snapshot() == (0, [])
    assert store.encoder_fingerprint is None and store.dimension is None
    assert store.get(["x"]) == {}
    assert store.delete(["x"]).first_seq is None
    assert store.upsert([], np.zeros((0, DIMENSION), np.float32), FINGERPRINT).changed == 0
    assert store.head() == 0


def test_keys_are_stable_and_never_reused(store: CatalogStore) -> None:
    first = store.upsert(products("a", "b", "c"), vectors(3), FINGERPRINT)
    assert len(set(first.keys)) == 3
    keys = dict(zip("abc", first.keys, strict=True))
    assert store.upsert(products("b"), vectors(1, 1), FINGERPRINT).keys == (keys["b"],)
    assert store.delete(["a"]).keys == (keys["a"],)
    revived = store.upsert(products("d", "a"), vectors(2, 2), FINGERPRINT)
    assert revived.keys[1] == keys["a"]
    assert revived.keys[0] not in keys.values()
    assert {p.id: p.key for p in store.snapshot()[1]} == {**keys, "d": revived.keys[0]}


def test_seqs_increase_and_are_consecutive_within_a_batch(store: CatalogStore) -> None:
    first = store.upsert(products("a", "b", "c"), vectors(3), FINGERPRINT)
    assert (first.first_seq, first.last_seq, first.changed) == (1, 3, 3)
    second = store.upsert(products("c", "d"), vectors(2, 1), FINGERPRINT)
    assert (second.first_seq, second.last_seq) == (4, 5)
    deleted = store.delete(["a", "b"])
    assert (deleted.first_seq, deleted.last_seq, deleted.changed) == (6, 7, 2)
    assert store.head() == 7
    # Each product's seq is its latest change's, in input order within the batch.
    assert {p.id: p.seq for p in store.changes(0)} == {"a": 6, "b": 7, "c": 4, "d": 5}


# Atomicity.


def test_an_id_twice_in_a_batch_writes_nothing(store: CatalogStore) -> None:
    store.upsert(products("a"), vectors(1), FINGERPRINT)
    with pytest.raises(ValueError, match="'b' appears twice"):
        store.upsert(products("b", "c", "b"), vectors(3), FINGERPRINT)
    assert store.head() == 1 and store.count() == 1 and set(store.get(["b", "c"])) == set()


def test_a_batch_failing_midway_writes_nothing(store: CatalogStore) -> None:
    store.upsert(products("a"), vectors(1), FINGERPRINT)
    batch = products(*(f"new-{i}" for i in range(50)), "a")
    # The last product cannot be stored (its attributes are not JSON): rows before it were
    # already sent when it fails.
    batch.append(product("bad", attributes={"when": object()}))
    with pytest.raises(TypeError):
        store.upsert(batch, vectors(len(batch), 1), FINGERPRINT)
    assert store.head() == 1
    assert store.count() == 1
    assert store.get(["a"], with_embeddings=True)["a"].seq == 1
    assert store.changes(0) == store.changes(0, limit=1) and len(store.changes(0)) == 1
    # The store is still usable, and the failed batch used up no seq and no key.
    after = store.upsert(products("b"), vectors(1, 2), FINGERPRINT)
    assert (after.first_seq, after.keys) == (2, (2,))


def test_a_failure_after_the_rows_are_written_writes_nothing(
    store: CatalogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected into the last step of a write (recording the counters), after every row."""
    store.upsert(products("a"), vectors(1), FINGERPRINT)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(type(store), "_set", staticmethod(fail))
    with pytest.raises(RuntimeError, match="injected"):
        store.upsert(products("b", "c"), vectors(2, 1), FINGERPRINT)
    with pytest.raises(RuntimeError, match="injected"):
        store.delete(["a"])
    monkeypatch.undo()
    assert store.head() == 1 and set(store.get(["a", "b", "c"])) == {"a"}


def test_bad_embeddings_are_refused(store: CatalogStore) -> None:
    with pytest.raises(ValueError, match="shape"):
        store.upsert(products("a", "b"), vectors(1), FINGERPRINT)
    bad = vectors(1)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        store.upsert(products("a"), bad, FINGERPRINT)
    assert store.head() == 0


# Deletes and the change log.


def test_delete_is_idempotent_and_keeps_a_tombstone(store: CatalogStore) -> None:
    written = store.upsert(products("a", "b"), vectors(2), FINGERPRINT)
    first = store.delete(["a", "unknown", "a"])
    assert (first.first_seq, first.last_seq, first.keys, first.changed) == (
        3,
        3,
        (written.keys[0],),
        1,
    )
    again = store.delete(["a", "unknown"])
    assert (again.first_seq, again.last_seq, again.keys, again.changed) == (None, None, (), 0)
    assert store.head() == 3
    assert store.get(["a"]) == {} and store.count() == 1
    (tombstone,) = store.changes(2)
    assert (tombstone.id, tombstone.deleted, tombstone.seq, tombstone.embedding) == (
        "a",
        True,
        3,
        None,
    )
    assert [p.id for p in store.snapshot()[1]] == ["b"]


def test_upserting_a_deleted_product_revives_it(store: CatalogStore) -> None:
    key = store.upsert(products("a"), vectors(1), FINGERPRINT).keys[0]
    store.delete(["a"])
    revived = store.upsert([product("a", "Back again")], vectors(1, 1), FINGERPRINT)
    assert revived.keys == (key,) and revived.first_seq == 3
    got = store.get(["a"], with_embeddings=True)["a"]
    assert (got.title, got.deleted, got.seq) == ("Back again", False, 3)
    np.testing.assert_array_equal(got.embedding, vectors(1, 1)[0])


def test_changes_are_latest_states_in_seq_order(store: CatalogStore) -> None:
    store.upsert(products("a", "b", "c"), vectors(3), FINGERPRINT)  # 1..3
    store.upsert([product("a", "A2")], vectors(1, 1), FINGERPRINT)  # 4
    store.delete(["b"])  # 5
    store.upsert(products("d"), vectors(1, 2), FINGERPRINT)  # 6
    everything = store.changes(0)
    assert [(p.id, p.seq, p.deleted) for p in everything] == [
        ("c", 3, False),
        ("a", 4, False),
        ("b", 5, True),
        ("d", 6, False),
    ]
    assert everything[1].title == "A2"
    assert all(p.embedding is not None for p in everything if not p.deleted)
    assert [p.seq for p in store.changes(3, limit=2)] == [4, 5]
    assert [p.seq for p in store.changes(5)] == [6]
    assert store.changes(6) == [] and store.changes(0, limit=0) == []
    assert all(p.embedding is None for p in store.changes(0, with_embeddings=False))


def test_a_follower_paging_with_limit_sees_every_final_state(store: CatalogStore) -> None:
    for i in range(10):
        store.upsert(products(f"p{i}", f"q{i % 3}"), vectors(2, i), FINGERPRINT)
    store.delete(["p4", "p7"])
    seen: dict[str, StoredProduct] = {}
    cursor = 0
    while page := store.changes(cursor, limit=3):
        seen.update((p.id, p) for p in page)
        cursor = page[-1].seq
    head, live = store.snapshot()
    assert cursor == head
    assert {i: p for i, p in seen.items() if not p.deleted} == {p.id: p for p in live}
    assert {i for i, p in seen.items() if p.deleted} == {"p4", "p7"}


def test_snapshot_is_the_state_at_its_seq(store: CatalogStore) -> None:
    store.upsert(products("a", "b", "c"), vectors(3), FINGERPRINT)
    store.delete(["b"])
    head, live = store.snapshot()
    assert head == store.head() == 4
    assert [p.id for p in live] == ["a", "c"]  # key order
    assert all(p.embedding is not None for p in live)
    assert all(p.embedding is None for p in store.snapshot(with_embeddings=False)[1])
    assert store.count() == 2


def test_snapshot_is_one_consistent_read(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection commits a write between the snapshot's two reads (the seq, then the
    products): the snapshot sees neither its seq nor its product."""
    with open_store(store_url) as store, open_store(store_url) as writer:
        store.upsert(products("a"), vectors(1), FINGERPRINT)
        read_meta = store._meta  # type: ignore[attr-defined]
        wrote = []

        def meta_then_write(name: str, cursor: Any = None) -> str | None:
            value = read_meta(name, cursor)
            if name == "last_seq" and not wrote:
                wrote.append(writer.upsert(products("b"), vectors(1, 1), FINGERPRINT))
            return value

        monkeypatch.setattr(store, "_meta", meta_then_write)
        head, live = store.snapshot()
        monkeypatch.undo()
        assert wrote, "the snapshot no longer reads its seq through _meta: fix this test"
        assert (head, [p.id for p in live]) == (1, ["a"])
        assert store.snapshot()[0] == 2 and store.count() == 2


# Encoders.


def test_another_encoder_is_refused_until_everything_is_reembedded(store: CatalogStore) -> None:
    written = store.upsert(products("a", "b"), vectors(2), FINGERPRINT)
    store.delete(["b"])
    with pytest.raises(StoreError, match=r"encoder-a.*encoder-b"):
        store.upsert(products("c"), vectors(1), "encoder-b")
    with pytest.raises(StoreError, match=rf"dimension {DIMENSION}.*dimension 16"):
        store.upsert(products("c"), vectors(1, dimension=16), FINGERPRINT)
    assert store.head() == 3

    head, live = store.snapshot(with_embeddings=False)
    new = {p.key: vectors(1, p.key, dimension=16)[0] for p in live}
    with pytest.raises(ValueError, match="1 missing"):
        store.reembed("encoder-b", {}, at_seq=head)
    store.upsert(products("c"), vectors(1), FINGERPRINT)  # the catalog moves on
    with pytest.raises(StoreError, match="changed since seq 3"):
        store.reembed("encoder-b", new, at_seq=head)

    head, live = store.snapshot(with_embeddings=False)
    new = {p.key: vectors(1, p.key, dimension=16)[0] for p in live}
    store.reembed("encoder-b", new, at_seq=head)
    assert (store.encoder_fingerprint, store.dimension, store.head()) == ("encoder-b", 16, head)
    for stored in store.snapshot()[1]:
        np.testing.assert_array_equal(stored.embedding, new[stored.key])
    assert store.get(["a"])["a"].seq == written.first_seq  # seqs unchanged
    with pytest.raises(StoreError, match="encoder-b"):
        store.upsert(products("d"), vectors(1), FINGERPRINT)
    assert store.upsert(products("d"), vectors(1, dimension=16), "encoder-b").changed == 1


# Schema, reopening, metadata, URLs.


def test_a_store_of_another_schema_version_is_refused(store_url: str) -> None:
    with open_store(store_url):
        pass
    raw_execute(store_url, "UPDATE meta SET value = '999' WHERE name = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 999"):
        open_store(store_url)


def test_everything_survives_reopening(store_url: str) -> None:
    with open_store(store_url) as store:
        store.upsert(products("a", "b", "c"), vectors(3), FINGERPRINT)
        store.delete(["b"])
        store.set_meta("seeded_catalog_sha256", "abc123")
        before = (store.store_id, store.changes(0), store.snapshot(), store.head())
    with pytest.raises(StoreError, match="closed"):
        store.head()
    store.close()  # twice is fine
    with open_store(store_url) as reopened:
        assert (reopened.store_id, reopened.changes(0), reopened.snapshot(), reopened.head()) == (
            before
        )
        assert reopened.get_meta("seeded_catalog_sha256") == "abc123"
        assert (reopened.encoder_fingerprint, reopened.dimension) == (FINGERPRINT, DIMENSION)
        # The key counter survived too: a new id does not get a used key.
        assert reopened.upsert(products("d"), vectors(1), FINGERPRINT).keys == (4,)


def test_meta(store: CatalogStore) -> None:
    assert store.get_meta("seeded_catalog_sha256") is None
    store.set_meta("seeded_catalog_sha256", "one")
    store.set_meta("seeded_catalog_sha256", "two")
    assert store.get_meta("seeded_catalog_sha256") == "two"
    for reserved in ("last_seq", "schema_version", "encoder_fingerprint"):
        with pytest.raises(ValueError, match="store's own"):
            store.set_meta(reserved, "0")
    assert store.head() == 0


def test_store_ids_differ_between_stores(store_url: str, tmp_path: Path) -> None:
    with open_store(store_url) as one, open_store(tmp_path / "other.sqlite3") as other:
        assert one.store_id != other.store_id
        assert len(one.store_id) == 36


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "new" / "dir" / "catalog.sqlite3"
    with open_store(f"sqlite://{path}") as store:
        assert isinstance(store, SqliteStore)
        assert store.url == f"sqlite://{path.resolve()}" and path.is_file()
        store_id = store.store_id
    monkeypatch.chdir(tmp_path)
    for same in (path, str(path), "sqlite:new/dir/catalog.sqlite3", "new/dir/catalog.sqlite3"):
        with open_store(same) as store:
            assert (store.store_id, store.url) == (store_id, f"sqlite://{path.resolve()}")
    for bad in ("mysql://host/db", "sqlite://host/catalog.sqlite3", ""):
        with pytest.raises(ValueError):
            open_store(bad)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreError, match=r"garbage\.sqlite3"):
        open_store(path)
    other = tmp_path / "other-application.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as db, db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(StoreError, match="not an ecomsearch store"):
        open_store(other)
    with contextlib.closing(sqlite3.connect(other)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]


def test_replicas_opening_a_new_sqlite_store_together_all_open_it(tmp_path: Path) -> None:
    """Switching a new file to WAL fails at once with `database is locked` (SQLite skips the
    busy handler) when another connection is opening it too; before the store retried, about
    one round in twelve lost a replica here."""
    import threading

    for attempt in range(150):
        path = tmp_path / f"new-{attempt}.sqlite3"
        store_ids: list[str] = []
        errors: list[BaseException] = []

        def open_it(path: Path = path, store_ids=store_ids, errors=errors) -> None:
            try:
                with open_store(path) as store:
                    store_ids.append(store.store_id)
            except BaseException as e:  # reported by the assertion below
                errors.append(e)

        replicas = [threading.Thread(target=open_it) for _ in range(6)]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.join(60)
        assert errors == [], f"round {attempt}: {errors[0]}"
        assert len(store_ids) == 6 and len(set(store_ids)) == 1, "one store, made once"


def test_postgres_url_never_shows_the_password(postgres_server: Any) -> None:
    url = postgres_server.create_database().replace("@", ":s3cret@", 1)  # trust auth ignores it
    with open_store(url) as store:
        assert "s3cret" not in store.url and "s3cret" not in repr(store)
        assert store.url == url.replace(":s3cret@", "@")
        with open_store(store.url) as again:
            assert again.store_id == store.store_id


def test_an_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="unreachable") as error:
        open_store("postgresql://someone:s3cret@127.0.0.1:1/db?connect_timeout=2")
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgres://u:p%40w@h1:5432,h2:5433/db?sslmode=require", None),
        ("postgresql://h/db?user=u&password=pw&sslmode=require", None),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///tmp/x.sqlite3", "sqlite:///tmp/x.sqlite3"),
        ("/tmp/x.sqlite3", "/tmp/x.sqlite3"),
    ],
)
def test_redact(url: str, redacted: str | None) -> None:
    result = redact(url)
    assert "pw" not in result and "p%40w" not in result
    if redacted is not None:
        assert result == redacted
    assert "sslmode=require" in result or "sslmode" not in url


def test_the_store_imports_without_psycopg(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"  # any `import psycopg` now fails
        "import numpy as np\n"
        "from ecomsearch.store import open_store, ProductWrite\n"
        f"with open_store({str(tmp_path / 'c.sqlite3')!r}) as s:\n"
        "    s.upsert([ProductWrite(id='a', title='A')], np.ones((1, 4), np.float32), 'f')\n"
        "    assert s.count() == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# Several processes.

WRITERS = 3
BATCHES_PER_WRITER = 120


def test_a_follower_sees_every_change_while_processes_write(store_url: str) -> None:
    """Writers commit small batches (inserts, updates, deletes) at once, with short pauses, while a
    follower polls changes(after_seq=cursor), moving its cursor to the last seq it saw. If a
    change could commit after one with a higher seq, the follower would skip it for good.
    The writers and the follower also race to create the store."""
    writers = [
        subprocess.Popen(
            [sys.executable, __file__, "writer", store_url, str(w), str(BATCHES_PER_WRITER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WRITERS)
    ]
    try:
        with open_store(store_url) as follower:
            # Every writer has opened the store; start them together.
            for w in writers:
                assert w.stdout is not None and w.stdin is not None
                assert w.stdout.readline() == "ready\n", w.communicate()[1]
            for w in writers:
                w.stdin.write("go\n")
                w.stdin.flush()
            seen: dict[str, StoredProduct] = {}
            seqs: list[int] = []
            cursor = 0
            polls_with_changes = 0
            while True:
                writing = any(w.poll() is None for w in writers)
                page = follower.changes(cursor, with_embeddings=False)
                if page:
                    polls_with_changes += 1
                    seqs += [change.seq for change in page]
                    seen.update((change.id, change) for change in page)
                    cursor = page[-1].seq
                elif not writing:
                    break
                time.sleep(0.001)
            outputs = [w.communicate(timeout=30) for w in writers]
            for w, (_, errors) in zip(writers, outputs, strict=True):
                assert w.returncode == 0, errors
            final = {p.id: p for p in follower.changes(0, with_embeddings=False)}
            head = follower.head()
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert polls_with_changes > 10, "the follower did not poll while the writers wrote"
    order = [change.id.split("-")[0] for change in sorted(final.values(), key=lambda p: p.seq)]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > 20, "the writers did not write at the same time"
    assert seqs == sorted(set(seqs)), "a seq seen twice, or out of order"
    assert cursor == head
    # Every change got a seq, and no seq was skipped.
    assert sum(int(out.split()[-1]) for out, _ in outputs) == head
    assert seen == final, _difference(seen, final)


def _difference(seen: dict[str, StoredProduct], final: dict[str, StoredProduct]) -> str:
    missing = sorted(set(final) - set(seen))
    stale = sorted(i for i in set(final) & set(seen) if seen[i] != final[i])
    return f"the follower missed {len(missing)} products (e.g. {missing[:5]}), {len(stale)} stale"


def test_every_acknowledged_write_survives_kill_9(store_url: str) -> None:
    """A writer prints each write's seqs once upsert has returned; killed with SIGKILL at some
    point (often mid-transaction), every write it acknowledged is in the reopened store."""
    with open_store(store_url):
        pass  # created here, so the writer starts writing at once
    writer = subprocess.Popen(
        [sys.executable, __file__, "acknowledger", store_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            acknowledged.append(json.loads(line))
            if len(acknowledged) == 25:
                os.kill(writer.pid, signal.SIGKILL)
                break
        rest, errors = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL, errors
    acknowledged += [json.loads(line) for line in rest.splitlines() if line.endswith("}")]
    assert len(acknowledged) >= 25
    with open_store(store_url) as store:
        assert store.head() >= acknowledged[-1]["last_seq"]
        expected = {
            f"b{ack['batch']}-{i}": ack["first_seq"] + i
            for ack in acknowledged
            for i in range(ack["last_seq"] - ack["first_seq"] + 1)
        }
        got = store.get(list(expected), with_embeddings=True)
        assert {i: p.seq for i, p in got.items()} == expected
        assert all(p.embedding is not None for p in got.values())
        # The killed writer left no lock behind.
        assert store.upsert(products("after"), vectors(1), FINGERPRINT).changed == 1


# The writer processes.

ACKNOWLEDGER_BATCH = 200


def write_concurrently(url: str, writer: int, batches: int) -> None:
    """Once told to go, inserts, updates and deletes its own products in small batches;
    prints how many seqs its writes used."""
    rng = np.random.default_rng(writer)
    used = 0
    with open_store(url) as store:
        print("ready", flush=True)
        sys.stdin.readline()  # the test starts every writer at once
        for batch in range(batches):
            ids = [f"w{writer}-{batch}-{i}" for i in range(int(rng.integers(1, 4)))]
            if batch >= 3 and batch % 3 == 0:
                ids.append(f"w{writer}-{batch - 3}-0")  # an update
            written = [product(i, f"{i} by batch {batch}") for i in ids]
            used += store.upsert(written, vectors(len(ids), batch), FINGERPRINT).changed
            if batch >= 5 and batch % 5 == 0:
                used += store.delete([f"w{writer}-{batch - 5}-0"]).changed
            # A pause between writes, as a real writer has: SQLite's busy handler polls, so
            # without one the writer holding the lock would starve the others.
            time.sleep(0.002)
    print(used)


def acknowledge_writes(url: str) -> None:
    """Writes batches until killed, printing each one's seqs after upsert returns."""
    with open_store(url) as store:
        batch = 0
        while True:
            ids = [f"b{batch}-{i}" for i in range(ACKNOWLEDGER_BATCH)]
            result = store.upsert([product(i) for i in ids], vectors(len(ids), batch), FINGERPRINT)
            line = {"batch": batch, "first_seq": result.first_seq, "last_seq": result.last_seq}
            print(json.dumps(line), flush=True)
            batch += 1


if __name__ == "__main__":
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "writer":
        write_concurrently(arguments[0], int(arguments[1]), int(arguments[2]))
    elif role == "acknowledger":
        acknowledge_writes(arguments[0])
    else:
        raise SystemExit(f"unknown role {role!r}")
