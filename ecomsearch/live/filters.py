"""Exact search filters: what a shopper may restrict a search to, and the per-row columns they
are evaluated on.

A filter becomes a boolean mask over the catalog's rows before any search: the vector search
and BM25 then only ever see rows that pass (see ecomsearch.live.catalog), so a result can never
fail a filter and a selective filter cannot starve the result list the way a post-filter over a
fixed candidate list would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ecomsearch import contract
from ecomsearch.catalog import split_category
from ecomsearch.errors import RequestError
from ecomsearch.query import visible_text


def _fold(text: str) -> str:
    """Case- and space-insensitive form of a brand or category level."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class SearchFilter:
    """One query's filters; the default passes everything."""

    category: tuple[str, ...] = ()  # folded levels of a category path prefix
    brand: str = ""  # folded brand, "" for any
    min_price: float | None = None
    max_price: float | None = None
    in_stock_only: bool = False

    @property
    def active(self) -> bool:
        return self != NO_FILTER

    @classmethod
    def parse(
        cls,
        category: str | None = None,
        brand: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        in_stock_only: bool = False,
    ) -> SearchFilter:
        """Checks raw filter values (as a request carries them); raises RequestError.

        Empty strings and NaN bounds mean "no filter of that kind", the values a request has
        for a query of a batch that filters nothing while its neighbours do."""
        levels: tuple[str, ...] = ()
        for name, value in ((contract.FILTER_CATEGORY, category), (contract.FILTER_BRAND, brand)):
            if value and len(value.encode("utf-8")) > contract.MAX_FILTER_BYTES:
                raise RequestError(f"{name!r} is longer than {contract.MAX_FILTER_BYTES} bytes")
            if value and not visible_text(value):
                raise RequestError(f"{name!r} has no visible text; send it empty for no filter")
        if category:
            levels = tuple(_fold(level) for level in split_category(category))
            if not levels:
                raise RequestError(f"{contract.FILTER_CATEGORY!r} {category!r} names no category")
        bounds = []
        for name, value in (
            (contract.FILTER_MIN_PRICE, min_price),
            (contract.FILTER_MAX_PRICE, max_price),
        ):
            if value is None or math.isnan(value):
                bounds.append(None)
            elif not math.isfinite(value) or value < 0:
                raise RequestError(f"{name!r} must be a finite price >= 0 (or NaN for none)")
            else:
                bounds.append(float(value))
        low, high = bounds
        if low is not None and high is not None and low > high:
            raise RequestError(f"{contract.FILTER_MIN_PRICE!r} {low} exceeds the maximum {high}")
        return cls(levels, _fold(brand or ""), low, high, bool(in_stock_only))


NO_FILTER = SearchFilter()


class FilterColumns:
    """The attributes filters read, one entry per catalog row; rows are only ever appended.

    Brands and category paths are stored as small integer codes, so a filter over tens of
    thousands of rows is a few vectorised comparisons: a brand filter compares codes, a category
    filter first finds the (few hundred) distinct paths under the prefix, then looks each row's
    code up in that table.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.count = 0
        # float32, as prices travel in requests (FP32 bounds) and results: a bound equal to a
        # product's price, as the client saw it, must pass it.
        self._price = np.full(capacity, np.nan, dtype=np.float32)
        self._in_stock = np.ones(capacity, dtype=bool)
        self._brand = np.zeros(capacity, dtype=np.int32)
        self._category = np.zeros(capacity, dtype=np.int32)
        self._brand_codes: dict[str, int] = {"": 0}
        self._category_codes: dict[tuple[str, ...], int] = {(): 0}

    def _grow(self, needed: int) -> None:
        capacity = len(self._price)
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity)
        fills = (("_price", np.nan), ("_in_stock", True), ("_brand", 0), ("_category", 0))
        for name, fill in fills:
            old = getattr(self, name)
            new = np.full(capacity, fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def append(
        self,
        brands: Sequence[str],
        category_paths: Sequence[Sequence[str]],
        prices: Sequence[float | None],
        in_stock: Sequence[bool],
    ) -> None:
        """Adds rows (all four sequences the same length, one entry per row)."""
        n = len(brands)
        if not (len(category_paths) == len(prices) == len(in_stock) == n):
            raise ValueError("filter columns must be appended together, one entry per row")
        self._grow(self.count + n)
        rows = slice(self.count, self.count + n)
        self._price[rows] = [np.nan if p is None else p for p in prices]
        self._in_stock[rows] = in_stock
        self._brand[rows] = [self._code(self._brand_codes, _fold(b)) for b in brands]
        self._category[rows] = [
            self._code(self._category_codes, tuple(_fold(level) for level in path))
            for path in category_paths
        ]
        self.count += n

    @staticmethod
    def _code(codes: dict, value) -> int:
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
        return code

    @property
    def prices(self) -> np.ndarray:
        """float32 [count]: each row's price, NaN without one (a view: read, never write)."""
        return self._price[: self.count]

    def mask(self, search_filter: SearchFilter) -> np.ndarray:
        """bool [count]: the rows that pass `search_filter`."""
        n = self.count
        passes = np.ones(n, dtype=bool)
        if search_filter.brand:
            code = self._brand_codes.get(search_filter.brand)
            if code is None:
                return np.zeros(n, dtype=bool)
            passes &= self._brand[:n] == code
        if search_filter.category:
            prefix, depth = search_filter.category, len(search_filter.category)
            table = np.zeros(len(self._category_codes), dtype=bool)
            for path, code in self._category_codes.items():
                table[code] = path[:depth] == prefix
            passes &= table[self._category[:n]]
        price = self._price[:n]
        with np.errstate(invalid="ignore"):  # NaN (no price) compares False: it fails a bound
            if search_filter.min_price is not None:
                passes &= price >= np.float32(search_filter.min_price)
            if search_filter.max_price is not None:
                passes &= price <= np.float32(search_filter.max_price)
        if search_filter.in_stock_only:
            passes &= self._in_stock[:n]
        return passes

    def categories(self) -> Iterable[tuple[str, ...]]:
        """The distinct (folded) category paths seen, for tests and benchmarks."""
        return (path for path in self._category_codes if path)
