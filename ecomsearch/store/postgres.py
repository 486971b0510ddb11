"""The catalog store in PostgreSQL (psycopg 3): for several machines, or a database that is
backed up and replicated anyway. Tables are named `ecomsearch_*`, so the store can share a
database with other applications.

Commit order equals seq order. A follower reads `changes(after_seq=cursor)` and moves its
cursor to the last seq it saw; if a change with a lower seq could commit after one with a
higher seq, the follower would skip it for good. A SEQUENCE cannot prevent that: nextval() is
not transactional, so writer A can take seq 5, writer B seq 6, and B commit first. So every
write transaction first locks the `last_seq` row of ecomsearch_meta (SELECT ... FOR UPDATE),
allocates its seqs from that counter and updates it, and holds the lock until it commits:
writers take turns, the next one reads the counter only after the previous one's commit, and
PostgreSQL releases a transaction's locks only once its commit is visible to every new
snapshot. Readers take no locks and are never blocked.

The event log does the same with a counter of its own, the `last_event_seq` row: event writers
take turns with each other, never with catalog writers. An event's products are resolved to
their keys in the event write's transaction (at READ COMMITTED: as of that statement), so a
delete committing while the event write finishes may precede the event in time; the event
still names the product by its key, which is never reused, as any event of a product deleted
later does.

psycopg is imported when a store is opened, not with this module, so importing
ecomsearch.store needs no PostgreSQL driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
    redact,
    reembed_matrix,
)
from ecomsearch.store.embedded import import_ssl

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "ecomsearch"
# Serialises schema creation (pg_advisory_xact_lock) between processes opening a new store at
# the same moment; an arbitrary constant, unique to ecomsearch.
_SCHEMA_LOCK_ID = 0x65636F6D73726368  # "ecomsrch"

# The event log, append-only, in seq order (the primary key is the index a follower reads by).
# Each event keeps its product's key and id, so a reader needs no join (and the key still names
# the product once it is deleted). `kind` indexes contract.EVENT_KINDS. Created on opening a
# store made before the log existed.
_EVENTS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ecomsearch_events (
        seq BIGINT PRIMARY KEY,
        user_id TEXT NOT NULL,
        product_key BIGINT NOT NULL,
        product_id TEXT NOT NULL,
        kind SMALLINT NOT NULL,
        quantity INTEGER NOT NULL,
        timestamp_s DOUBLE PRECISION NOT NULL
    )""",
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ecomsearch_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Keys come from the next_key counter in ecomsearch_meta; embedding is raw little-endian
    # float32.
    """CREATE TABLE IF NOT EXISTS ecomsearch_products (
        key BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        seq BIGINT NOT NULL,
        deleted BOOLEAN NOT NULL,
        title TEXT NOT NULL,
        brand TEXT NOT NULL,
        category_path TEXT[] NOT NULL,
        description TEXT NOT NULL,
        price DOUBLE PRECISION,
        in_stock BOOLEAN NOT NULL,
        attributes JSONB NOT NULL,
        embedding BYTEA
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS ecomsearch_products_seq ON ecomsearch_products (seq)",
    # Float vectors do not compress: do not spend time trying when one passes the TOAST size.
    "ALTER TABLE ecomsearch_products ALTER COLUMN embedding SET STORAGE EXTERNAL",
    *_EVENTS_SCHEMA,
)
_COLUMNS = (
    "key",
    "id",
    "seq",
    "deleted",
    "title",
    "brand",
    "category_path",
    "description",
    "price",
    "in_stock",
    "attributes",
    "embedding",
)
_TYPES = (
    "bigint",
    "text",
    "bigint",
    "boolean",
    "text",
    "text",
    "text[]",
    "text",
    "double precision",
    "boolean",
    "jsonb",
    "bytea",
)
_COLUMN_LIST = ", ".join(_COLUMNS)
# A product's key and id never change; everything else is replaced.
_REPLACED = _COLUMNS[2:]
_UPSERT = f"""
    INSERT INTO ecomsearch_products ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM ecomsearch_incoming
    ON CONFLICT (key) DO UPDATE SET ({", ".join(_REPLACED)})
        = ({", ".join(f"EXCLUDED.{column}" for column in _REPLACED)})
"""
_EVENT_COLUMNS = "seq, user_id, product_key, product_id, kind, quantity, timestamp_s"
_EVENT_TYPES = ("bigint", "text", "bigint", "text", "smallint", "integer", "double precision")


def _select(with_embeddings: bool) -> str:
    embedding = "embedding" if with_embeddings else "NULL::bytea"
    return f"SELECT {', '.join(_COLUMNS[:-1])}, {embedding} FROM ecomsearch_products"


def _product(row: tuple) -> StoredProduct:
    key, id_, seq, deleted, title, brand, path, description, price, in_stock, attrs, blob = row
    return StoredProduct(
        key=key,
        id=id_,
        seq=seq,
        deleted=deleted,
        title=title,
        brand=brand,
        category_path=tuple(path),
        description=description,
        price=price,
        in_stock=in_stock,
        attributes=attrs,
        embedding=decode_embedding(blob),
    )


class PostgresStore(CatalogStore):
    """A catalog store in the PostgreSQL database at `url` (a libpq URL; a password may come
    from the URL, PGPASSWORD or ~/.pgpass). The tables are made on first use."""

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        import_ssl()  # before psycopg, which imports it (see ecomsearch.store.embedded)
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self.url = redact(url)
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"catalog store {self.url}: not a PostgreSQL URL: {e}") from e
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            options["connect_timeout"] = connect_timeout_s
        if "application_name" not in given:
            options["application_name"] = APPLICATION_NAME
        try:
            # autocommit: a read is one statement, and holds no transaction open between calls;
            # writes and snapshots open theirs explicitly.
            self._conn: psycopg.Connection | None = psycopg.connect(url, **options)
        except psycopg.Error as e:
            raise StoreError(f"catalog store {self.url} is unreachable: {e}") from e
        try:
            with self._errors():
                self.store_id = self._open_schema()
        except BaseException:
            self.close()
            raise

    # Connection, transactions, errors.

    @property
    def _db(self) -> psycopg.Connection:
        if self._conn is None:
            raise StoreError(f"catalog store {self.url} is closed")
        return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.OperationalError as e:
            raise StoreError(f"catalog store {self.url} is unreachable: {e}") from e
        except psycopg.Error as e:
            raise StoreError(f"catalog store {self.url}: {e}") from e

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[psycopg.Cursor, dict[str, str]]]:
        """A write transaction holding the writers' lock (see the module's docstring), with the
        store's own meta entries as of the previous write's commit."""
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.execute(
                "SELECT value FROM ecomsearch_meta WHERE name = %s FOR UPDATE", (META_LAST_SEQ,)
            )
            if cursor.fetchone() is None:
                raise StoreError(f"catalog store {self.url} has no seq counter")
            cursor.execute(
                "SELECT name, value FROM ecomsearch_meta WHERE name = ANY(%s)",
                ([META_LAST_SEQ, META_NEXT_KEY, META_ENCODER_FINGERPRINT, META_DIMENSION],),
            )
            yield cursor, dict(cursor.fetchall())

    def _open_schema(self) -> str:
        """Creates the tables on first use (under an advisory lock, so two processes opening a
        new store at once create it once); checks the schema version. Returns the store id.
        An existing store is only read: a reader needs no CREATE privilege."""
        db = self._db
        (exists,) = db.execute("SELECT to_regclass('ecomsearch_meta') IS NOT NULL").fetchone()
        if not exists:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
                for statement in _SCHEMA:
                    db.execute(statement)
                with db.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO ecomsearch_meta (name, value) VALUES (%s, %s) "
                        "ON CONFLICT (name) DO NOTHING",
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
        """Adds the event log to a store made before it had one (under the schema lock, like
        the tables of a new store). Other tables are left as they are, so the schema version
        stays; a store that has the log is only read, as in _open_schema."""
        db = self._db
        (exists,) = db.execute("SELECT to_regclass('ecomsearch_events') IS NOT NULL").fetchone()
        if exists:
            return
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
            for statement in _EVENTS_SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO ecomsearch_meta (name, value) VALUES (%s, '0') "
                "ON CONFLICT (name) DO NOTHING",
                (META_LAST_EVENT_SEQ,),
            )

    def _meta(self, name: str, cursor: psycopg.Cursor | None = None) -> str | None:
        row = (
            (self._db if cursor is None else cursor)
            .execute("SELECT value FROM ecomsearch_meta WHERE name = %s", (name,))
            .fetchone()
        )
        return None if row is None else row[0]

    @staticmethod
    def _set(cursor: psycopg.Cursor, values: Mapping[str, str]) -> None:
        cursor.executemany(
            "INSERT INTO ecomsearch_meta (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            list(values.items()),
        )

    # Writes.

    def upsert(
        self, products: Sequence[ProductWrite], embeddings: np.ndarray, encoder_fingerprint: str
    ) -> WriteResult:
        from psycopg.types.json import Jsonb

        matrix = batch_embeddings(products, embeddings)
        if not products:
            return WriteResult.nothing()
        ids = [product.id for product in products]
        with self._errors(), self._write() as (cursor, meta):
            stored_dimension = meta.get(META_DIMENSION)
            check_encoder(
                self.url,
                meta.get(META_ENCODER_FINGERPRINT),
                None if stored_dimension is None else int(stored_dimension),
                encoder_fingerprint,
                matrix.shape[1],
            )
            cursor.execute("SELECT id, key FROM ecomsearch_products WHERE id = ANY(%s)", (ids,))
            keys, next_key = allocate_keys(ids, dict(cursor.fetchall()), int(meta[META_NEXT_KEY]))
            first_seq = int(meta[META_LAST_SEQ]) + 1
            # COPY into a scratch table, then one INSERT ... ON CONFLICT: tens of thousands of
            # rows in seconds, where row-by-row statements would take minutes.
            cursor.execute(
                "CREATE TEMP TABLE ecomsearch_incoming (LIKE ecomsearch_products) ON COMMIT DROP"
            )
            with cursor.copy(
                f"COPY ecomsearch_incoming ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(list(_TYPES))
                for i, (key, product) in enumerate(zip(keys, products, strict=True)):
                    copy.write_row(
                        (
                            key,
                            product.id,
                            first_seq + i,
                            False,
                            product.title,
                            product.brand,
                            list(product.category_path),
                            product.description,
                            price_or_none(product.price),
                            bool(product.in_stock),
                            # Through the same canonical JSON as SQLite: NaN is refused alike.
                            Jsonb(product.attributes, dumps=attributes_json),
                            matrix[i].tobytes(),
                        )
                    )
            cursor.execute(_UPSERT)
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
        with self._errors(), self._write() as (cursor, meta):
            cursor.execute(
                "SELECT id, key FROM ecomsearch_products WHERE NOT deleted AND id = ANY(%s)",
                (ids,),
            )
            live = dict(cursor.fetchall())
            keys = [live[product_id] for product_id in ids if product_id in live]
            if not keys:
                return WriteResult.nothing()
            first_seq = int(meta[META_LAST_SEQ]) + 1
            seqs = list(range(first_seq, first_seq + len(keys)))
            cursor.execute(
                "UPDATE ecomsearch_products AS p SET deleted = true, seq = d.seq, embedding = NULL "
                "FROM unnest(%s::bigint[], %s::bigint[]) AS d (key, seq) WHERE p.key = d.key",
                (keys, seqs),
            )
            self._set(cursor, {META_LAST_SEQ: str(seqs[-1])})
        return WriteResult(first_seq, seqs[-1], tuple(keys), len(keys))

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
        with self._errors(), self._write() as (cursor, meta):
            cursor.execute("SELECT key FROM ecomsearch_products WHERE NOT deleted")
            live = {key for (key,) in cursor.fetchall()}
            check_reembed(self.url, int(meta[META_LAST_SEQ]), at_seq, live, encoded)
            cursor.execute(
                "CREATE TEMP TABLE ecomsearch_reembed (key BIGINT, embedding BYTEA) ON COMMIT DROP"
            )
            with cursor.copy(
                "COPY ecomsearch_reembed (key, embedding) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["bigint", "bytea"])
                for key, blob in encoded.items():
                    copy.write_row((key, blob))
            cursor.execute(
                "UPDATE ecomsearch_products AS p SET embedding = r.embedding "
                "FROM ecomsearch_reembed AS r WHERE p.key = r.key"
            )
            self._set(cursor, {META_ENCODER_FINGERPRINT: encoder_fingerprint})
            if dimension is None:
                cursor.execute("DELETE FROM ecomsearch_meta WHERE name = %s", (META_DIMENSION,))
            else:
                self._set(cursor, {META_DIMENSION: str(dimension)})

    def record_events(self, events: Sequence[Event]) -> EventsResult:
        rows = check_events(events)
        if not rows:
            return EventsResult(first_seq=None, last_seq=None, recorded=0)
        product_ids = distinct(row[1] for row in rows)
        with self._errors(), self._db.transaction(), self._db.cursor() as cursor:
            # The event writers' lock, held to the commit (see the module's docstring).
            cursor.execute(
                "SELECT value FROM ecomsearch_meta WHERE name = %s FOR UPDATE",
                (META_LAST_EVENT_SEQ,),
            )
            counter = cursor.fetchone()
            if counter is None:
                raise StoreError(f"catalog store {self.url} has no event seq counter")
            cursor.execute(
                "SELECT id, key FROM ecomsearch_products WHERE NOT deleted AND id = ANY(%s)",
                (product_ids,),
            )
            keys = dict(cursor.fetchall())
            if len(keys) != len(product_ids):
                raise UnknownProductsError(self.url, [i for i in product_ids if i not in keys])
            first_seq = int(counter[0]) + 1
            # Binary COPY straight into the log (its seqs are new, nothing can conflict): a few
            # hundred thousand events a second, where row-by-row INSERTs would take minutes.
            with cursor.copy(
                f"COPY ecomsearch_events ({_EVENT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(list(_EVENT_TYPES))
                for i, (user_id, product_id, kind, quantity, when) in enumerate(rows):
                    copy.write_row(
                        (first_seq + i, user_id, keys[product_id], product_id, kind, quantity, when)
                    )
            last_seq = first_seq + len(rows) - 1
            self._set(cursor, {META_LAST_EVENT_SEQ: str(last_seq)})
        return EventsResult(first_seq=first_seq, last_seq=last_seq, recorded=len(rows))

    def set_meta(self, name: str, value: str) -> None:
        check_user_meta_name(name)
        if not isinstance(value, str):
            raise ValueError(f"meta value for {name!r} must be a string")
        with self._errors(), self._db.cursor() as cursor:
            self._set(cursor, {name: value})

    # Reads.

    def head(self) -> int:
        with self._errors():
            return int(self._meta(META_LAST_SEQ) or 0)

    def get(self, ids: Sequence[str], with_embeddings: bool = False) -> dict[str, StoredProduct]:
        ids = distinct(ids)
        if not ids:
            return {}
        with self._errors(), self._db.cursor(binary=True) as cursor:
            cursor.execute(f"{_select(with_embeddings)} WHERE NOT deleted AND id = ANY(%s)", (ids,))
            return {row[1]: _product(row) for row in cursor}

    def changes(
        self, after_seq: int, limit: int | None = None, with_embeddings: bool = True
    ) -> list[StoredProduct]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._errors(), self._db.cursor(binary=True) as cursor:
            cursor.execute(
                f"{_select(with_embeddings)} WHERE seq > %s ORDER BY seq LIMIT %s",
                (int(after_seq), limit),
            )
            return [_product(row) for row in cursor]

    def events_head(self) -> int:
        with self._errors():
            return int(self._meta(META_LAST_EVENT_SEQ) or 0)

    def events(self, after_seq: int, limit: int | None = None) -> EventLog:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._errors(), self._db.cursor(binary=True) as cursor:
            cursor.execute(
                f"SELECT {_EVENT_COLUMNS} FROM ecomsearch_events WHERE seq > %s "
                "ORDER BY seq LIMIT %s",
                (int(after_seq), None if limit is None else int(limit)),
            )
            return event_log(cursor.fetchall())

    def snapshot(self, with_embeddings: bool = True) -> tuple[int, list[StoredProduct]]:
        db = self._db
        with self._errors(), db.transaction(), db.cursor(binary=True) as cursor:
            # One snapshot for both reads: the seq is exactly the state of the rows.
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            head = int(self._meta(META_LAST_SEQ, cursor) or 0)
            cursor.execute(f"{_select(with_embeddings)} WHERE NOT deleted ORDER BY key")
            return head, [_product(row) for row in cursor]

    def count(self) -> int:
        with self._errors():
            row = self._db.execute(
                "SELECT count(*) FROM ecomsearch_products WHERE NOT deleted"
            ).fetchone()
        return int(row[0])

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
        # A session-level advisory lock (the connection is in autocommit, so no transaction is
        # held open meanwhile); released explicitly, or by the server if the holder dies.
        key = int.from_bytes(
            hashlib.sha256(f"ecomsearch:{name}".encode()).digest()[:8], "big", signed=True
        )
        with self._errors():
            self._db.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):  # a lost connection released it already
                    self._db.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
