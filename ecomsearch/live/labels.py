"""What `select` returns for a product key: its id, title, price and stock, kept fresh.

Indexed by store key (keys are small integers the store hands out in order), so labelling the
top-k of a batch is a few array lookups. Loaded from the store at start and kept up to date by
a ChangeFollower, independently of any index: `select` never needs the FAISS index, and an
index switch (compaction) does not concern it, because keys do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ProductLabels:
    def __init__(self, capacity: int = 1024) -> None:
        self.applied_seq = 0
        self._ids = np.full(capacity, b"", dtype=object)
        self._titles = np.full(capacity, b"", dtype=object)
        self._prices = np.full(capacity, np.nan, dtype=np.float32)
        self._in_stock = np.zeros(capacity, dtype=bool)
        self._live = np.zeros(capacity, dtype=bool)

    @property
    def capacity(self) -> int:
        return len(self._live)

    @property
    def live_count(self) -> int:
        return int(self._live.sum())

    def _grow(self, key: int) -> None:
        if key < self.capacity:
            return
        capacity = max(key + 1, 2 * self.capacity)
        for name, fill in (
            ("_ids", b""),
            ("_titles", b""),
            ("_prices", np.nan),
            ("_in_stock", False),
            ("_live", False),
        ):
            old = getattr(self, name)
            new = np.full(capacity, fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _set(
        self, key: int, product_id: str, title: str, price: float | None, in_stock: bool
    ) -> None:
        """A live product's labels at `key` (which the arrays already hold)."""
        self._live[key] = True
        self._ids[key] = product_id.encode("utf-8")
        self._titles[key] = title.encode("utf-8")
        self._prices[key] = np.nan if price is None else price
        self._in_stock[key] = in_stock

    def apply(self, changes: Sequence[Any]) -> int:
        """Applies store records (ecomsearch.store.StoredProduct) in ascending seq order: a
        snapshot's live products, or the change log's latest states. Idempotent."""
        fresh = [c for c in changes if c.seq > self.applied_seq]
        if not fresh:
            return 0
        self._grow(max(c.key for c in fresh))
        for change in fresh:
            self._set(change.key, change.id, change.title, change.price, change.in_stock)
            self._live[change.key] = not change.deleted
        self.applied_seq = max(self.applied_seq, fresh[-1].seq)
        return len(fresh)

    def load(self, seq: int, products: Sequence[Any]) -> None:
        """A store snapshot: every live product at change `seq`."""
        if products:
            self._grow(max(p.key for p in products))
        for product in products:
            self._set(product.key, product.id, product.title, product.price, product.in_stock)
        self.applied_seq = seq

    def live(self, keys: np.ndarray) -> np.ndarray:
        """bool, shaped like `keys`: whether each is a live product (padding -1 is not)."""
        inside = (keys >= 0) & (keys < self.capacity)
        return inside & self._live[np.where(inside, keys, 0)]

    def known(self, keys: np.ndarray) -> np.ndarray:
        """bool: whether each key was ever seen (live or deleted); padding -1 counts as known."""
        inside = (keys >= 0) & (keys < self.capacity)
        seen = inside & (self._ids[np.where(inside, keys, 0)] != b"")
        return seen | (keys == -1)

    def labels(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """ids, titles (UTF-8 bytes), prices (float32, NaN: none) and in_stock of keys shaped
        like `keys`; empty/NaN/False where a key is not a live product (padding)."""
        live = self.live(keys)
        safe = np.where(live, keys, 0)
        ids, titles = self._ids[safe], self._titles[safe]
        prices, in_stock = self._prices[safe], self._in_stock[safe]
        if not live.all():
            ids[~live], titles[~live] = b"", b""
            prices = np.where(live, prices, np.float32(np.nan)).astype(np.float32)
            in_stock = in_stock & live
        return {"ids": ids, "titles": titles, "prices": prices, "in_stock": in_stock}

    @classmethod
    def from_index(cls, keys: np.ndarray, metadata: Sequence[dict[str, Any]]) -> ProductLabels:
        """The labels of a static index (no store): its rows' keys and metadata records."""
        table = cls(int(keys.max(initial=0)) + 1)
        for key, record in zip(keys.tolist(), metadata, strict=True):
            table._set(
                key,
                record["id"],
                record["title"],
                record.get("price"),
                record.get("in_stock", True),
            )
        return table
