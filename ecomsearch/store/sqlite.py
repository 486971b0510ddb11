"""The catalog store in one SQLite file: for a single machine (several processes may share it).

Writers serialise with `BEGIN IMMEDIATE`: a write transaction takes the database's write lock
before it reads the seq counter, so seqs are allocated and committed in one order, the order
followers see. The event log's seqs come from a counter of their own, under the same lock: an
event write and a catalog write also take turns, so an event's product is live in the catalog
at its commit. Readers never wait for writers (WAL), and see whole transactions only.

Durability: WAL with `synchronous=FULL`, so a write that returned is on disk, and survives the
writer being killed or the machine losing power.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ecomsearch.store.base import (
    META_DIMENSION,
    META_ENCODER_FINGERPRINT,
    META_LAST_EVENT_SEQ,
    META_LAST_SEQ,
    META_NEXT_KEY,
    META_SCHEMA_VERSION,
    META_STORE_ID,
    SCHEMA_VERSION,
    CatalogStore,
    Event,
    EventLog,
    EventsResult,
    ProductWrite,
    StoredProduct,
    StoreError,
    UnknownProductsError,
    WriteResult,
    allocate_keys,
    attributes_json,
    batch_embeddings,
    check_encoder,
    check_events,
    check_reembed,
    check_user_meta_name,
    decode_embedding,
    distinct,
    event_log,
    price_or_none,
    reembed_matrix,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
# Ids per `IN (...)` list: below SQLite's historical limit of 999 bound parameters.
_IDS_PER_QUERY = 500

# The event log, append-only. `seq` is the rowid: reading after a seq is a range scan of the
# table itself, and appending in seq order writes at its end. Each event keeps its product's key
# and id, so a reader needs no join (and the key still names the product once it is deleted).
# `kind` indexes contract.EVENT_KINDS. Created on opening a store made before the log existed.
_EVENTS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL,
        product_key INTEGER NOT NULL,
        product_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        quantity INTEGER NOT NULL,
        timestamp_s REAL NOT NULL
    )""",
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # `key` is the rowid; keys come from the next_key counter in meta, never from SQLite.
    # category_path and attributes are JSON text; embedding is raw little-endian float32.
    """CREATE TABLE IF NOT EXISTS products (
        key INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        title TEXT NOT NULL,
        brand TEXT NOT NULL,
        category_path TEXT NOT NULL,
        description TEXT NOT NULL,
        price REAL,
        in_stock INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        embedding BLOB
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS products_seq ON products (seq)",
    *_EVENTS_SCHEMA,
)
_COLUMNS = (
    "key, id, seq, deleted, title, brand, category_path, description, price, in_stock, attributes"
)
_UPSERT = f"""
    INSERT INTO products ({_COLUMNS}, embedding) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET
        seq = excluded.seq, deleted = 0, title = excluded.title, brand = excluded.brand,
        category_path = excluded.category_path, description = excluded.description,
        price = excluded.price, in_stock = excluded.in_stock, attributes = excluded.attributes,
        embedding = excluded.embedding
"""
_EVENT_COLUMNS = "seq, user_id, product_key, product_id, kind, quantity, timestamp_s"
_RECORD = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_READ_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"


def _select(with_embeddings: bool) -> str:
    return f"SELECT {_COLUMNS}, {'embedding' if with_embeddings else 'NULL'} FROM products"


def _product(row: tuple) -> StoredProduct:
    key, id_, seq, deleted, title, brand, path, description, price, in_stock, attrs, blob = row
    return StoredProduct(
        key=key,
        id=id_,
        seq=seq,
        deleted=bool(deleted),
        title=title,
        brand=brand,
        category_path=tuple(json.loads(path)),
        description=description,
        price=price,
        in_stock=bool(in_stock),
        attributes=json.loads(attrs),
        embedding=decode_embedding(blob),
    )


def _chunks(items: Sequence[str], size: int = _IDS_PER_QUERY) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SqliteStore(CatalogStore):
    """A catalog store in the SQLite file at `path` (made, with its directory, if missing)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path).expanduser().resolve()
        self.url = f"sqlite://{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"catalog store {self.url}: cannot create its directory: {e}") from e
        # isolation_level=None: no implicit transactions; this class issues BEGIN itself.
        # check_same_thread=False: a store may move between threads (one at a time).
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"catalog store {self.url}: cannot open: {e}") from e
        self.busy_timeout_s = busy_timeout_s
        try:
            with self._errors():
                self._configure()
                self.store_id = self._open_schema()
        except BaseException:
            self.close()
            raise

    # Connection, transactions, errors.

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"catalog store {self.url} is closed")
        return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"catalog store {self.url}: {e}") from e

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Cursor]:
        """A transaction: a write one takes the write lock first (waiting up to the busy
        timeout), a read one sees one snapshot of the database throughout."""
        db = self._db
        cursor = db.cursor()
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cursor
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _configure(self) -> None:
        db = self._db
        mode = self._switch_to_wal(db)
        if mode.lower() != "wal":
            # Some filesystems (network ones) cannot do WAL; writes stay durable and atomic,
            # but readers and writers then block each other.
            log.warning("catalog store %s: journal mode is %s, not WAL", self.url, mode)
        db.execute("PRAGMA synchronous=FULL")

    def _switch_to_wal(self, db: sqlite3.Connection) -> str:
        """Sets WAL journal mode and returns the mode the file is in, retrying while another
        connection holds the file. SQLite answers `database is locked` at once, without calling
        the busy handler, when the switch would deadlock with a connection that is itself
        opening the file, so replicas opening a new store together need this loop; the busy
        timeout still bounds it."""
        deadline_s = time.monotonic() + self.busy_timeout_s
        pause_s = 0.005
        while True:
            try:
                (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() + pause_s > deadline_s:
                    raise
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.1)

    def _open_schema(self) -> str:
        """Creates the tables on first use, under the write lock so two processes opening a
        new store at once create it once; checks the schema version. Returns the store id."""
        if not self._has_meta():
            with self._transaction(write=True) as cursor:
                others = cursor.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'meta'"
                ).fetchall()
                if others and not self._has_meta():
                    # Another application's database: do not add tables to it.
                    raise StoreError(
                        f"catalog store {self.url} holds other tables "
                        f"({', '.join(name for (name,) in others[:5])}): not an ecomsearch store"
                    )
                for statement in _SCHEMA:
                    cursor.execute(statement)
                cursor.executemany(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                    [
                        (META_SCHEMA_VERSION, str(SCHEMA_VERSION)),
                        (META_STORE_ID, str(uuid.uuid4())),
                        (META_LAST_SEQ, "0"),
                        (META_LAST_EVENT_SEQ, "0"),
                        (META_NEXT_KEY, "1"),
                    ],
                )
        version = self._meta(META_SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION):
            raise StoreError(
                f"catalog store {self.url} has schema version {version}; this ecomsearch reads "
                f"version {SCHEMA_VERSION} (rebuild the store from the catalog)"
            )
        store_id = self._meta(META_STORE_ID)
        if store_id is None:
            raise StoreError(f"catalog store {self.url} has no store id: not an ecomsearch store")
        self._open_events()
        return store_id

    def _open_events(self) -> None:
        """Adds the event log to a store made before it had one, under the write lock (two
        processes may open such a store at once). Other tables are left as they are, so the
        schema version stays; a store made with the log only reads sqlite_master here."""
        if self._has_table("events"):
            return
        with self._transaction(write=True) as cursor:
            for statement in _EVENTS_SCHEMA:
                cursor.execute(statement)
            cursor.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, '0')", (META_LAST_EVENT_SEQ,)
            )

    def _has_meta(self) -> bool:
        return self._has_table("meta")

    def _has_table(self, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def _meta(self, name: str, cursor: sqlite3.Cursor | None = None) -> str | None:
        row = (
            (self._db if cursor is None else cursor)
            .execute("SELECT value FROM meta WHERE name = ?", (name,))
            .fetchone()
        )
        return None if row is None else row[0]

    @staticmethod
    def _set(cursor: sqlite3.Cursor, values: Mapping[str, str]) -> None:
        cursor.executemany(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )

    def _keys(self, cursor: sqlite3.Cursor, ids: Sequence[str], live_only: bool) -> dict[str, int]:
        found: dict[str, int] = {}
        where = "deleted = 0 AND " if live_only else ""
        for chunk in _chunks(ids):
            marks = ", ".join("?" * len(chunk))
            cursor.execute(f"SELECT id, key FROM products WHERE {where}id IN ({marks})", chunk)
            found.update(cursor.fetchall())
        return found

    # Writes.

    def upsert(
        self, products: Sequence[ProductWrite], embeddings: np.ndarray, encoder_fingerprint: str
    ) -> WriteResult:
        matrix = batch_embeddings(products, embeddings)
        if not products:
            return WriteResult.nothing()
        ids = [product.id for product in products]
        with self._errors(), self._transaction(write=True) as cursor:
            stored_dimension = self._meta(META_DIMENSION, cursor)
            check_encoder(
                self.url,
                self._meta(META_ENCODER_FINGERPRINT, cursor),
                None if stored_dimension is None else int(stored_dimension),
                encoder_fingerprint,
                matrix.shape[1],
            )
            first_seq = int(self._meta(META_LAST_SEQ, cursor) or 0) + 1
            keys, next_key = allocate_keys(
                ids,
                self._keys(cursor, ids, live_only=False),
                int(self._meta(META_NEXT_KEY, cursor)),
            )
            # A generator: a row that fails to encode (say, attributes that are not JSON)
            # fails the statement midway, and the rollback undoes the rows before it.
            cursor.executemany(
                _UPSERT,
                (
                    (
                        key,
                        product.id,
                        first_seq + i,
                        product.title,
                        product.brand,
                        json.dumps(list(product.category_path), ensure_ascii=False),
                        product.description,
                        price_or_none(product.price),
                        int(bool(product.in_stock)),
                        attributes_json(product.attributes),
                        matrix[i].tobytes(),
                    )
                    for i, (key, product) in enumerate(zip(keys, products, strict=True))
                ),
            )
            last_seq = first_seq + len(products) - 1
            self._set(
                cursor,
                {
                    META_LAST_SEQ: str(last_seq),
                    META_NEXT_KEY: str(next_key),
                    META_ENCODER_FINGERPRINT: encoder_fingerprint,
                    META_DIMENSION: str(matrix.shape[1]),
                },
            )
        return WriteResult(first_seq, last_seq, tuple(keys), len(products))

    def delete(self, ids: Sequence[str]) -> WriteResult:
        ids = distinct(ids)
        if not ids:
            return WriteResult.nothing()
        with self._errors(), self._transaction(write=True) as cursor:
            live = self._keys(cursor, ids, live_only=True)
            keys = [live[product_id] for product_id in ids if product_id in live]
            if not keys:
                return WriteResult.nothing()
            first_seq = int(self._meta(META_LAST_SEQ, cursor) or 0) + 1
            cursor.executemany(
                "UPDATE products SET deleted = 1, seq = ?, embedding = NULL WHERE key = ?",
                [(first_seq + i, key) for i, key in enumerate(keys)],
            )
            last_seq = first_seq + len(keys) - 1
            self._set(cursor, {META_LAST_SEQ: str(last_seq)})
        return WriteResult(first_seq, last_seq, tuple(keys), len(keys))

    def reembed(
        self,
        encoder_fingerprint: str,
        embeddings_by_key: Mapping[int, np.ndarray],
        *,
        at_seq: int,
    ) -> None:
        if not isinstance(encoder_fingerprint, str) or not encoder_fingerprint:
            raise ValueError("encoder_fingerprint must be a non-empty string")
        dimension, encoded = reembed_matrix(embeddings_by_key)
        with self._errors(), self._transaction(write=True) as cursor:
            head = int(self._meta(META_LAST_SEQ, cursor) or 0)
            live = {key for (key,) in cursor.execute("SELECT key FROM products WHERE deleted = 0")}
            check_reembed(self.url, head, at_seq, live, encoded)
            cursor.executemany(
                "UPDATE products SET embedding = ? WHERE key = ?",
                [(blob, key) for key, blob in encoded.items()],
            )
            self._set(cursor, {META_ENCODER_FINGERPRINT: encoder_fingerprint})
            if dimension is None:
                cursor.execute("DELETE FROM meta WHERE name = ?", (META_DIMENSION,))
            else:
                self._set(cursor, {META_DIMENSION: str(dimension)})

    def record_events(self, events: Sequence[Event]) -> EventsResult:
        rows = check_events(events)
        if not rows:
            return EventsResult(first_seq=None, last_seq=None, recorded=0)
        product_ids = distinct(row[1] for row in rows)
        with self._errors(), self._transaction(write=True) as cursor:
            # Under the write lock: no catalog write can delete a product before this commits.
            keys = self._keys(cursor, product_ids, live_only=True)
            if len(keys) != len(product_ids):
                raise UnknownProductsError(self.url, [i for i in product_ids if i not in keys])
            first_seq = int(self._meta(META_LAST_EVENT_SEQ, cursor) or 0) + 1
            # One prepared statement for every row, in the one transaction: a few hundred
            # thousand events a second.
            cursor.executemany(
                _RECORD,
                (
                    (first_seq + i, user_id, keys[product_id], product_id, kind, quantity, when)
                    for i, (user_id, product_id, kind, quantity, when) in enumerate(rows)
                ),
            )
            last_seq = first_seq + len(rows) - 1
            self._set(cursor, {META_LAST_EVENT_SEQ: str(last_seq)})
        return EventsResult(first_seq=first_seq, last_seq=last_seq, recorded=len(rows))

    def set_meta(self, name: str, value: str) -> None:
        check_user_meta_name(name)
        if not isinstance(value, str):
            raise ValueError(f"meta value for {name!r} must be a string")
        with self._errors(), self._transaction(write=True) as cursor:
            self._set(cursor, {name: value})

    # Reads.

    def head(self) -> int:
        with self._errors():
            return int(self._meta(META_LAST_SEQ) or 0)

    def get(self, ids: Sequence[str], with_embeddings: bool = False) -> dict[str, StoredProduct]:
        ids = distinct(ids)
        found: dict[str, StoredProduct] = {}
        with self._errors(), self._transaction(write=False) as cursor:
            for chunk in _chunks(ids):
                marks = ", ".join("?" * len(chunk))
                cursor.execute(
                    f"{_select(with_embeddings)} WHERE deleted = 0 AND id IN ({marks})", chunk
                )
                for row in cursor:
                    found[row[1]] = _product(row)
        return found

    def changes(
        self, after_seq: int, limit: int | None = None, with_embeddings: bool = True
    ) -> list[StoredProduct]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._errors():
            rows = self._db.execute(
                f"{_select(with_embeddings)} WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(after_seq), -1 if limit is None else int(limit)),
            ).fetchall()
        return [_product(row) for row in rows]

    def events_head(self) -> int:
        with self._errors():
            return int(self._meta(META_LAST_EVENT_SEQ) or 0)

    def events(self, after_seq: int, limit: int | None = None) -> EventLog:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._errors():
            rows = self._db.execute(
                _READ_EVENTS, (int(after_seq), -1 if limit is None else int(limit))
            ).fetchall()
        return event_log(rows)

    def snapshot(self, with_embeddings: bool = True) -> tuple[int, list[StoredProduct]]:
        with self._errors(), self._transaction(write=False) as cursor:
            head = int(self._meta(META_LAST_SEQ, cursor) or 0)
            rows = cursor.execute(
                f"{_select(with_embeddings)} WHERE deleted = 0 ORDER BY key"
            ).fetchall()
        return head, [_product(row) for row in rows]

    def count(self) -> int:
        with self._errors():
            (live,) = self._db.execute("SELECT count(*) FROM products WHERE deleted = 0").fetchone()
        return live

    def get_meta(self, name: str) -> str | None:
        with self._errors():
            return self._meta(name)

    @property
    def encoder_fingerprint(self) -> str | None:
        with self._errors():
            return self._meta(META_ENCODER_FINGERPRINT)

    @property
    def dimension(self) -> int | None:
        with self._errors():
            value = self._meta(META_DIMENSION)
        return None if value is None else int(value)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        # Every user of a SQLite file is on this machine: a lock file beside it will do, released
        # by the kernel if the holder dies.
        lock_path = self.path.with_name(f"{self.path.name}.{name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
