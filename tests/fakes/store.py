"""An in-memory catalog store for unit tests: the CatalogStore calls the write path makes
(`upsert`, `delete`, `get`, `head`, `changes`, the encoder), with the same rules as the real
stores where they matter to a caller: one seq per changed product, consecutive in input order;
tombstones on delete; unknown ids skipped; another encoder's embeddings refused.

`fail_next` makes the next write raise the given exception (a store outage), writing nothing.
`writes` records each committed write as ("upsert", ids) or ("delete", ids).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ecomsearch.store import ProductWrite, StoredProduct, StoreError, WriteResult


class FakeStore:
    url = "memory://fake"
    store_id = "fake-store"

    def __init__(self, encoder_fingerprint: str | None = None) -> None:
        self._products: dict[str, StoredProduct] = {}
        self._seq = 0
        self._next_key = 0
        self._encoder_fingerprint = encoder_fingerprint
        self._dimension: int | None = None
        self.fail_next: Exception | None = None
        self.writes: list[tuple[str, list[str]]] = []
        self.closed = False
        self._exclusive: dict[str, threading.Lock] = {}

    @property
    def encoder_fingerprint(self) -> str | None:
        return self._encoder_fingerprint

    @property
    def dimension(self) -> int | None:
        return self._dimension

    def head(self) -> int:
        return self._seq

    def _raise_if_failing(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def upsert(
        self, products: Sequence[ProductWrite], embeddings: np.ndarray, encoder_fingerprint: str
    ) -> WriteResult:
        self._raise_if_failing()
        ids = [product.id for product in products]
        if len(set(ids)) != len(ids):
            raise ValueError("an id twice in one write")
        matrix = np.asarray(embeddings)
        if matrix.dtype != np.float32 or matrix.shape[:1] != (len(products),) or matrix.ndim != 2:
            raise ValueError(f"embeddings must be float32 [{len(products)}, d], got {matrix}")
        if self._encoder_fingerprint not in (None, encoder_fingerprint) or self._dimension not in (
            None,
            matrix.shape[1],
        ):
            raise StoreError("another encoder's embeddings")
        if not products:
            return WriteResult.nothing()
        first_seq, keys = self._seq + 1, []
        for product, embedding in zip(products, matrix, strict=True):
            old = self._products.get(product.id)
            key = old.key if old is not None else self._next_key
            self._next_key += old is None
            self._seq += 1
            keys.append(key)
            self._products[product.id] = StoredProduct(
                key=key,
                id=product.id,
                seq=self._seq,
                deleted=False,
                title=product.title,
                brand=product.brand,
                category_path=tuple(product.category_path),
                description=product.description,
                price=product.price,
                in_stock=product.in_stock,
                attributes=dict(product.attributes),
                embedding=np.array(embedding, dtype=np.float32),
            )
        self._encoder_fingerprint, self._dimension = encoder_fingerprint, matrix.shape[1]
        self.writes.append(("upsert", ids))
        return WriteResult(first_seq, self._seq, tuple(keys), len(products))

    def delete(self, ids: Sequence[str]) -> WriteResult:
        self._raise_if_failing()
        live = [i for i in dict.fromkeys(ids) if i in self._products]
        live = [i for i in live if not self._products[i].deleted]
        if not live:
            return WriteResult.nothing()
        first_seq = self._seq + 1
        for product_id in live:
            self._seq += 1
            self._products[product_id] = replace(
                self._products[product_id], seq=self._seq, deleted=True, embedding=None
            )
        self.writes.append(("delete", live))
        return WriteResult(
            first_seq, self._seq, tuple(self._products[i].key for i in live), len(live)
        )

    def get(self, ids: Sequence[str], with_embeddings: bool = False) -> dict[str, StoredProduct]:
        found = {}
        for product_id in dict.fromkeys(ids):
            product = self._products.get(product_id)
            if product is None or product.deleted:
                continue
            embedding = product.embedding.copy() if with_embeddings else None
            if embedding is not None:
                embedding.flags.writeable = False
            found[product_id] = replace(product, embedding=embedding)
        return found

    def changes(
        self, after_seq: int, limit: int | None = None, with_embeddings: bool = True
    ) -> list[StoredProduct]:
        changed = sorted(
            (p for p in self._products.values() if p.seq > after_seq), key=lambda p: p.seq
        )
        if not with_embeddings:
            changed = [replace(p, embedding=None) for p in changed]
        return changed if limit is None else changed[:limit]

    def count(self) -> int:
        return sum(not p.deleted for p in self._products.values())

    def exclusive(self, name: str) -> threading.Lock:
        return self._exclusive.setdefault(name, threading.Lock())

    def close(self) -> None:
        self.closed = True
