"""The catalog of record: products, their embeddings and a change log, and the shoppers' event
log, in SQLite or PostgreSQL.

`open_store(url)` opens (creating on first use) a store:

- `sqlite:///abs/path.sqlite3`, `sqlite:relative/path`, or a bare filesystem path: SQLite;
- `postgresql://...` or `postgres://...` (any libpq URL; the password from the URL, PGPASSWORD
  or ~/.pgpass): PostgreSQL, through psycopg 3, imported only then.

A store object is one connection, for one thread at a time: a follower thread or process opens
its own with `open_store(store.url)` (`url` never holds a password; one given by other means
still applies).
"""

from __future__ import annotations

from pathlib import Path

from ecomsearch.store.base import (
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
    catalog_product,
    product_write,
    redact,
)

__all__ = [
    "SCHEMA_VERSION",
    "CatalogStore",
    "Event",
    "EventLog",
    "EventsResult",
    "ProductWrite",
    "StoreError",
    "StoredProduct",
    "UnknownProductsError",
    "WriteResult",
    "catalog_product",
    "open_store",
    "product_write",
    "redact",
    "sqlite_path",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite:"


def sqlite_path(url: str | Path) -> Path | None:
    """The file a SQLite store URL or bare path names (not yet resolved), or None if `url` is
    not one. Raises ValueError for a URL of another scheme or a `sqlite://host/...` URL."""
    if isinstance(url, Path):
        return url
    text = str(url)
    if text.startswith(_POSTGRES_SCHEMES):
        return None
    if text.startswith(_SQLITE_SCHEME):
        rest = text[len(_SQLITE_SCHEME) :]
        if rest.startswith("//"):  # sqlite:///abs/path: an empty host, then the path
            rest = rest[2:]
            if not rest.startswith("/"):
                raise ValueError(f"{text!r}: a SQLite URL names no host (sqlite:///abs/path)")
        if not rest:
            raise ValueError(f"{text!r} names no file")
        return Path(rest)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"unsupported catalog store URL scheme {scheme!r} in {redact(text)!r}: use sqlite:, "
            "postgresql:// or a file path"
        )
    if not text:
        raise ValueError("empty catalog store URL")
    return Path(text)


def open_store(url: str | Path) -> CatalogStore:
    """Opens the catalog store at `url`, creating it (and a SQLite file's directory) on first
    use. Raises StoreError when it cannot be opened (unreachable, wrong schema version, not
    a store), ValueError for a URL it does not understand."""
    path = sqlite_path(url)
    if path is not None:
        from ecomsearch.store.sqlite import SqliteStore

        return SqliteStore(path)
    from ecomsearch.store.postgres import PostgresStore

    return PostgresStore(str(url))
