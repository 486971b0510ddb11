"""The catalog of record: what a store holds, the interface both implementations share, and
the checks and encodings they have in common.

A store keeps one row per product id, ever. The row holds the product's latest state and the
change sequence number (seq) of its latest change; deleting a product turns its row into a
tombstone (with a new seq) instead of removing it, so a follower reading `changes()` learns
of the delete. Every change gets its own seq, and a store commits changes in seq order: a
follower that reads `changes(after_seq=cursor)` and moves its cursor to the last seq it saw
never misses a change (see the implementations for how each one guarantees it).

A store also keeps the shoppers' event log (views, carts, purchases): append-only, one row per
event, each with an event seq of its own counter (independent of the catalog's: recording an
event changes no product). Event seqs are committed in seq order too, so a follower or a
trainer reading `events(after_seq=cursor)` the same way never misses an event. An event names
a product live in the catalog when it is recorded, and keeps that product's key: keys are never
reused, so an event still names the same product after the product is deleted.

A store object wraps one database connection and is used by one thread at a time; a follower
thread or process opens its own with `ecomsearch.store.open_store(store.url)`.
"""

from __future__ import annotations

import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ecomsearch import contract
from ecomsearch.catalog import Product, join_category
from ecomsearch.query import visible_text

# Bumped whenever the tables change shape; a store of another version is refused on open
# (there is no migration yet: rebuild the store from the catalog). A new table is not a change
# of shape: a store opening one made before it (the event log) adds it, leaving the rest alone.
SCHEMA_VERSION = 1

# Embeddings are stored as raw little-endian float32 bytes, whatever the machine.
EMBEDDING_DTYPE = np.dtype("<f4")

# Meta entries the store itself keeps; set_meta refuses them.
META_SCHEMA_VERSION = "schema_version"
META_STORE_ID = "store_id"
META_LAST_SEQ = "last_seq"
META_LAST_EVENT_SEQ = "last_event_seq"  # the event log's counter (see record_events)
META_NEXT_KEY = "next_key"
META_ENCODER_FINGERPRINT = "encoder_fingerprint"
META_DIMENSION = "dimension"
RESERVED_META = frozenset(
    {
        META_SCHEMA_VERSION,
        META_STORE_ID,
        META_LAST_SEQ,
        META_LAST_EVENT_SEQ,
        META_NEXT_KEY,
        META_ENCODER_FINGERPRINT,
        META_DIMENSION,
    }
)


class StoreError(RuntimeError):
    """A store-level failure: wrong schema version, encoder mismatch, unreachable database,
    a file that is not a store. The message says which store (its URL, never a password)."""


@dataclass(frozen=True, eq=False)
class StoredProduct:
    """A product as the store holds it: its latest state, or its tombstone (`deleted`).

    Equality compares every field, the embedding by value."""

    key: int  # stable int64 row key: assigned on the id's first insert, never reused
    id: str
    seq: int  # the change sequence number of this product's latest change
    deleted: bool
    title: str
    brand: str = ""
    category_path: tuple[str, ...] = ()
    description: str = ""
    price: float | None = None
    in_stock: bool = True
    attributes: dict[str, Any] = field(default_factory=dict)  # the product's other fields
    # float32 [dimension], read-only (a view of the bytes read); None when not asked for, and
    # always None for a tombstone (deleting a product drops its embedding).
    embedding: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredProduct):
            return NotImplemented
        same_embedding = (
            self.embedding is None and other.embedding is None
            if self.embedding is None or other.embedding is None
            else np.array_equal(self.embedding, other.embedding)
        )
        return same_embedding and _fields(self) == _fields(other)


def _fields(product: StoredProduct) -> tuple[Any, ...]:
    return (
        product.key,
        product.id,
        product.seq,
        product.deleted,
        product.title,
        product.brand,
        product.category_path,
        product.description,
        product.price,
        product.in_stock,
        product.attributes,
    )


@dataclass(frozen=True)
class ProductWrite:
    """What a writer sends for one product (validated by the caller: non-empty id and title,
    price finite and >= 0 or None, attributes JSON-able)."""

    id: str
    title: str
    brand: str = ""
    category_path: tuple[str, ...] = ()
    description: str = ""
    price: float | None = None
    in_stock: bool = True
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    first_seq: int | None  # None when the write changed nothing (e.g. deleting unknown ids)
    last_seq: int | None
    keys: tuple[int, ...]  # each written product's key, in input order (deletes: each id deleted)
    changed: int  # products changed

    @classmethod
    def nothing(cls) -> WriteResult:
        return cls(first_seq=None, last_seq=None, keys=(), changed=0)


@dataclass(frozen=True)
class Event:
    """One shopper's event as a writer sends it (validated by the store, see record_events)."""

    user_id: str
    product_id: str
    kind: str  # one of contract.EVENT_KINDS
    timestamp_s: float  # when it happened: seconds since the epoch, UTC
    quantity: int = 1


@dataclass(frozen=True, eq=False)
class EventLog:
    """A run of the event log, column-wise (what followers and trainers read), in seq order.

    Columns, not Event objects: a trainer reads millions of events, and counts them with numpy.
    Equality compares every column by value."""

    seqs: np.ndarray  # int64 [n], increasing
    user_ids: list[str]
    product_ids: list[str]
    product_keys: np.ndarray  # int64 [n]: the product's store key (stable, never reused)
    kinds: np.ndarray  # int8 [n]: index into contract.EVENT_KINDS
    quantities: np.ndarray  # int32 [n]
    timestamps_s: np.ndarray  # float64 [n]

    def __len__(self) -> int:
        return len(self.seqs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventLog):
            return NotImplemented
        return (
            self.user_ids == other.user_ids
            and self.product_ids == other.product_ids
            and all(
                mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
                for mine, theirs in zip(_arrays(self), _arrays(other), strict=True)
            )
        )

    @classmethod
    def empty(cls) -> EventLog:
        return cls(
            seqs=np.zeros(0, np.int64),
            user_ids=[],
            product_ids=[],
            product_keys=np.zeros(0, np.int64),
            kinds=np.zeros(0, np.int8),
            quantities=np.zeros(0, np.int32),
            timestamps_s=np.zeros(0, np.float64),
        )


def _arrays(log: EventLog) -> tuple[np.ndarray, ...]:
    return (log.seqs, log.product_keys, log.kinds, log.quantities, log.timestamps_s)


class UnknownProductsError(ValueError):
    """Events name products that are not live in the catalog; nothing was written. `.ids` lists
    them (distinct, in order)."""

    def __init__(self, url: str, ids: Sequence[str]) -> None:
        self.url = url
        self.ids = list(ids)
        shown = ", ".join(repr(product_id) for product_id in self.ids[:5])
        more = f" and {len(self.ids) - 5} more" if len(self.ids) > 5 else ""
        super().__init__(
            f"catalog store {url}: events name {len(self.ids)} product(s) that are not in the "
            f"live catalog ({shown}{more}); no event was recorded"
        )

    def __reduce__(self) -> tuple[type[UnknownProductsError], tuple[str, list[str]]]:
        # Pickled with its arguments, not its message: it crosses process boundaries intact.
        return type(self), (self.url, self.ids)


@dataclass(frozen=True)
class EventsResult:
    first_seq: int | None  # None when no events were given
    last_seq: int | None
    recorded: int  # events written


class CatalogStore(ABC):
    """The catalog of record. One connection: use an object from one thread at a time."""

    url: str  # where the store is, without any password: safe to log and to record
    store_id: str  # a random UUID made with the store; identifies it across URLs

    @abstractmethod
    def head(self) -> int:
        """The last committed seq (0 for an empty store)."""

    @abstractmethod
    def upsert(
        self, products: Sequence[ProductWrite], embeddings: np.ndarray, encoder_fingerprint: str
    ) -> WriteResult:
        """Inserts or replaces `products` in one transaction (all or nothing).

        Each product gets its own seq, consecutive in input order. `embeddings` is float32
        [len(products), dimension], row i for products[i]. A product deleted earlier comes
        back with its old key. The first write records the encoder's fingerprint and the
        dimension; a write with another of either raises StoreError (re-embed every product
        with `reembed` first). An id twice in one batch raises ValueError, writing nothing."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> WriteResult:
        """Turns the live products among `ids` into tombstones, each with a new seq (in input
        order), in one transaction. Unknown and already deleted ids are skipped."""

    @abstractmethod
    def reembed(
        self,
        encoder_fingerprint: str,
        embeddings_by_key: Mapping[int, np.ndarray],
        *,
        at_seq: int,
    ) -> None:
        """Replaces every live product's embedding and the recorded encoder (fingerprint and
        dimension) in one transaction, leaving seqs alone: the way to change encoders.

        `embeddings_by_key` holds one float32 [dimension] vector per live product, made from
        the catalog as of seq `at_seq` (read it with `snapshot()`). If the store has changed
        since (head != at_seq) this raises StoreError and writes nothing: take a new snapshot
        and try again. Followers notice the new `encoder_fingerprint` (no seq changes)."""

    @abstractmethod
    def record_events(self, events: Sequence[Event]) -> EventsResult:
        """Appends `events` to the event log in one transaction (all or nothing).

        Every event is checked first (see `check_events`): a bad one raises ValueError naming
        its position. Each product must be live in the catalog: it is resolved, in the write's
        own transaction, to its key, which the log keeps (see each store for exactly when).
        Otherwise this raises UnknownProductsError (a ValueError) listing them. Each event gets
        its own event seq, consecutive in input order, from the log's counter (not the
        catalog's seq). Bulk loads belong in one call: hundreds of thousands of events take
        seconds."""

    @abstractmethod
    def events_head(self) -> int:
        """The last committed event seq (0 before the first event)."""

    @abstractmethod
    def events(self, after_seq: int, limit: int | None = None) -> EventLog:
        """The events whose event seq > after_seq, in seq order; with `limit`, the first `limit`
        of them. An indexed query: cheap to poll."""

    @abstractmethod
    def get(self, ids: Sequence[str], with_embeddings: bool = False) -> dict[str, StoredProduct]:
        """The live products among `ids`, by id (unknown and deleted ids are absent)."""

    @abstractmethod
    def changes(
        self, after_seq: int, limit: int | None = None, with_embeddings: bool = True
    ) -> list[StoredProduct]:
        """The latest state, tombstones included, of every product whose seq > after_seq, in
        seq order; with `limit`, the first `limit` of them. An indexed query: cheap to poll."""

    @abstractmethod
    def snapshot(self, with_embeddings: bool = True) -> tuple[int, list[StoredProduct]]:
        """(seq, every live product), read in one consistent snapshot: the products are exactly
        the store's state at that seq. Products are in key order."""

    @abstractmethod
    def count(self) -> int:
        """The number of live products."""

    @abstractmethod
    def get_meta(self, name: str) -> str | None:
        """A small key/value kept with the store (e.g. 'seeded_catalog_sha256'), or None."""

    @abstractmethod
    def set_meta(self, name: str, value: str) -> None:
        """Sets a meta entry. The store's own entries (RESERVED_META) are refused."""

    @property
    @abstractmethod
    def encoder_fingerprint(self) -> str | None:
        """The fingerprint of the encoder that made the stored embeddings (None before the
        first write)."""

    @property
    @abstractmethod
    def dimension(self) -> int | None:
        """The stored embeddings' dimension (None before the first write)."""

    @abstractmethod
    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Holds the store-wide lock `name` for the `with` block: one holder at a time among
        every process (and machine) using this store, the others waiting. For work made of
        several transactions that must not interleave with itself, such as loading a catalog
        file (check, upsert, delete, record), which two pods starting together would
        otherwise both do."""

    @abstractmethod
    def close(self) -> None:
        """Closes the connection; closing twice is fine."""

    def __enter__(self) -> CatalogStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# What the implementations share.


def check_user_meta_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a meta name must be a non-empty string")
    if name in RESERVED_META:
        raise ValueError(f"meta entry {name!r} is the store's own; it cannot be set")


def batch_embeddings(products: Sequence[ProductWrite], embeddings: np.ndarray) -> np.ndarray:
    """Checks a write batch before anything is written; returns the embeddings as a contiguous
    little-endian float32 matrix. Raises ValueError on a repeated id or a bad matrix."""
    seen: set[str] = set()
    for product in products:
        if product.id in seen:
            raise ValueError(f"product id {product.id!r} appears twice in one write")
        seen.add(product.id)
    matrix = np.asarray(embeddings)
    if matrix.ndim != 2 or matrix.shape[0] != len(products) or matrix.shape[1] < 1:
        raise ValueError(
            f"embeddings must be float32 [{len(products)}, dimension], got shape {matrix.shape}"
        )
    matrix = np.ascontiguousarray(matrix, dtype=EMBEDDING_DTYPE)
    if not np.isfinite(matrix).all():
        raise ValueError("embeddings must be finite")
    return matrix


def reembed_matrix(
    embeddings_by_key: Mapping[int, np.ndarray],
) -> tuple[int | None, dict[int, bytes]]:
    """The dimension and the bytes by key of a reembed's vectors, after checking they share
    one dimension and are finite (dimension None when there are none). Raises ValueError."""
    encoded: dict[int, bytes] = {}
    dimension: int | None = None
    for key, vector in embeddings_by_key.items():
        row = np.ascontiguousarray(vector, dtype=EMBEDDING_DTYPE)
        if row.ndim != 1 or row.shape[0] < 1:
            raise ValueError(f"key {key}: an embedding must be [dimension], got {row.shape}")
        if dimension is not None and row.shape[0] != dimension:
            raise ValueError(f"key {key}: dimension {row.shape[0]}, others have {dimension}")
        if not np.isfinite(row).all():
            raise ValueError(f"key {key}: the embedding must be finite")
        dimension = row.shape[0]
        encoded[int(key)] = row.tobytes()
    return dimension, encoded


def check_encoder(
    url: str,
    stored_fingerprint: str | None,
    stored_dimension: int | None,
    fingerprint: str,
    dimension: int,
) -> None:
    """Raises StoreError when a write's encoder differs from the one the store's embeddings
    came from (a store with no embeddings yet accepts any)."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("encoder_fingerprint must be a non-empty string")
    if stored_fingerprint is None:
        return
    # The dimension is unknown only after re-embedding a store with no live products.
    if stored_fingerprint != fingerprint or stored_dimension not in (None, dimension):
        raise StoreError(
            f"catalog store {url} holds embeddings of encoder {stored_fingerprint} "
            f"(dimension {stored_dimension}); this write's are from encoder {fingerprint} "
            f"(dimension {dimension}). Re-embed every product with reembed() before writing "
            "with another encoder."
        )


def check_reembed(
    url: str, head: int, at_seq: int, live_keys: set[int], keys: Iterable[int]
) -> None:
    """Raises unless a reembed was computed from the current state and covers exactly the
    live products."""
    given = set(keys)
    if head != at_seq:
        raise StoreError(
            f"catalog store {url} changed since seq {at_seq} (it is at {head}): take a new "
            "snapshot, embed it, and reembed again"
        )
    if given != live_keys:
        missing, extra = sorted(live_keys - given), sorted(given - live_keys)
        raise ValueError(
            "reembed needs exactly one embedding per live product: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} not live (e.g. {extra[:5]})"
        )


_KIND_INDEX = {kind: index for index, kind in enumerate(contract.EVENT_KINDS)}
# Error messages show a value's repr cut to this many characters: an id may be long junk.
_SHOWN_CHARS = 60

EventRow = tuple[str, str, int, int, float]  # user_id, product_id, kind index, quantity, time


def check_events(events: Sequence[Event]) -> list[EventRow]:
    """Checks every event before anything is written, the same way in every store; returns
    each one as (user_id, product_id, kind index, quantity, timestamp_s) in plain Python types.
    Raises ValueError naming the first bad event's position.

    What is refused and why: a user id must identify someone (a visible character) and fit
    the contract (MAX_USER_ID_BYTES of UTF-8); NUL fits in no PostgreSQL text, and is refused
    in SQLite too so both stores hold the same log. A quantity is a count, not a flag (no
    bool); a timestamp is a real moment (finite, not before the epoch)."""
    rows: list[EventRow] = []
    product_ids_seen: set[str] = set()
    for position, event in enumerate(events):
        if not isinstance(event, Event):
            raise ValueError(f"event {position} is a {type(event).__name__}, not an Event")
        product_id = event.product_id
        if product_id not in product_ids_seen:
            _check_product_id(position, product_id)
            product_ids_seen.add(product_id)
        rows.append(
            (
                _checked_user_id(position, event.user_id),
                product_id,
                _checked_kind(position, event.kind),
                _checked_quantity(position, event.quantity),
                _checked_timestamp(position, event.timestamp_s),
            )
        )
    return rows


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}..."


def _utf8_size(position: int, name: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            f"event {position}: {name} {_shown(text)} is not valid Unicode (a lone surrogate)"
        ) from None


def _checked_user_id(position: int, user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(
            f"event {position}: user_id must be a non-empty string, not {_shown(user_id)}"
        )
    if "\x00" in user_id:
        raise ValueError(f"event {position}: user_id {_shown(user_id)} contains NUL")
    size = _utf8_size(position, "user_id", user_id)
    if size > contract.MAX_USER_ID_BYTES:
        raise ValueError(
            f"event {position}: user_id is {size} bytes of UTF-8; the maximum is "
            f"{contract.MAX_USER_ID_BYTES}"
        )
    if not visible_text(user_id):
        raise ValueError(f"event {position}: user_id {_shown(user_id)} has no visible characters")
    return user_id


def _check_product_id(position: int, product_id: object) -> None:
    if not isinstance(product_id, str) or not product_id:
        raise ValueError(
            f"event {position}: product_id must be a non-empty string, not {_shown(product_id)}"
        )
    if "\x00" in product_id:
        raise ValueError(f"event {position}: product_id {_shown(product_id)} contains NUL")
    _utf8_size(position, "product_id", product_id)


def _checked_kind(position: int, kind: object) -> int:
    index = _KIND_INDEX.get(kind) if isinstance(kind, str) else None
    if index is None:
        raise ValueError(
            f"event {position}: kind {_shown(kind)} is not one of {', '.join(contract.EVENT_KINDS)}"
        )
    return index


def _checked_quantity(position: int, quantity: object) -> int:
    if type(quantity) is not int:  # the fast path; numpy integers are fine too, bools are not
        if isinstance(quantity, bool) or not isinstance(quantity, numbers.Integral):
            raise ValueError(f"event {position}: quantity must be an int, not {_shown(quantity)}")
        quantity = int(quantity)
    if not 1 <= quantity <= contract.MAX_EVENT_QUANTITY:
        raise ValueError(
            f"event {position}: quantity {quantity} is not between 1 and "
            f"{contract.MAX_EVENT_QUANTITY}"
        )
    return quantity


def _checked_timestamp(position: int, timestamp_s: object) -> float:
    if type(timestamp_s) is not float:
        if isinstance(timestamp_s, bool) or not isinstance(timestamp_s, numbers.Real):
            raise ValueError(
                f"event {position}: timestamp_s must be a number of seconds since the epoch, "
                f"not {_shown(timestamp_s)}"
            )
        try:
            timestamp_s = float(timestamp_s)
        except OverflowError:
            raise ValueError(
                f"event {position}: timestamp_s {_shown(timestamp_s)} is not finite"
            ) from None
    if not math.isfinite(timestamp_s) or timestamp_s < 0:
        raise ValueError(
            f"event {position}: timestamp_s {timestamp_s!r} must be finite and >= 0 (seconds "
            "since the epoch, UTC)"
        )
    return timestamp_s


def event_log(rows: Sequence[tuple[int, str, int, str, int, int, float]]) -> EventLog:
    """The EventLog of rows read as (seq, user_id, product_key, product_id, kind, quantity,
    timestamp_s), in seq order."""
    if not rows:
        return EventLog.empty()
    seqs, user_ids, product_keys, product_ids, kinds, quantities, timestamps = zip(
        *rows, strict=True
    )
    return EventLog(
        seqs=np.array(seqs, dtype=np.int64),
        user_ids=list(user_ids),
        product_ids=list(product_ids),
        product_keys=np.array(product_keys, dtype=np.int64),
        kinds=np.array(kinds, dtype=np.int8),
        quantities=np.array(quantities, dtype=np.int32),
        timestamps_s=np.array(timestamps, dtype=np.float64),
    )


def distinct(ids: Iterable[str]) -> list[str]:
    """`ids` without repeats, first occurrences in order."""
    return list(dict.fromkeys(ids))


def allocate_keys(
    ids: Sequence[str], existing: Mapping[str, int], next_key: int
) -> tuple[list[int], int]:
    """The key of each id (its existing one, or the next unused one), and the next unused key
    afterwards. Keys come from a counter and are never reused."""
    keys = []
    for product_id in ids:
        key = existing.get(product_id)
        if key is None:
            key, next_key = next_key, next_key + 1
        keys.append(key)
    return keys, next_key


def attributes_json(attributes: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, no NaN: PostgreSQL's jsonb refuses it too)."""
    return json.dumps(attributes, ensure_ascii=False, sort_keys=True, allow_nan=False)


def decode_embedding(blob: bytes | memoryview | None) -> np.ndarray | None:
    if blob is None:
        return None
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE)


def price_or_none(price: float | None) -> float | None:
    if price is None:
        return None
    price = float(price)
    if not math.isfinite(price):
        raise ValueError(f"price {price!r} must be finite")
    return price


def redact(url: str) -> str:
    """`url` without its password (in the user part or a `password` query parameter): safe to
    log and to record. Anything else comes back unchanged, character for character."""
    text = str(url)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc, query = parts.netloc, parts.query
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}@{hosts}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(name, value) for name, value in pairs if name.lower() != "password"]
        if len(kept) != len(pairs):
            query = urlencode(kept)
    if (netloc, query) == (parts.netloc, parts.query):
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# --- between the catalog's Product and the store's records: the one place that maps them ---


def product_write(product: Product) -> ProductWrite:
    """What the store is given for a catalog Product (a catalog file's, or a write's)."""
    return ProductWrite(
        id=product.id,
        title=product.title,
        brand=product.brand,
        category_path=product.category_path,
        description=product.description,
        price=product.price,
        in_stock=product.in_stock,
        attributes=product.attributes,
    )


def catalog_product(record: StoredProduct | ProductWrite) -> Product:
    """The catalog Product of a store record: what the index, BM25 and the encoder's text
    (ecomsearch.catalog.product_text) are made of."""
    return Product(
        id=record.id,
        title=record.title,
        brand=record.brand,
        category=join_category(record.category_path),
        description=record.description,
        price=record.price,
        in_stock=record.in_stock,
        attributes=dict(record.attributes),
    )
