"""Search filters (ecomsearch.live.filters): what SearchFilter.parse accepts, and FilterColumns
masks checked against a plain Python predicate over generated products and filters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecomsearch import contract
from ecomsearch.errors import RequestError
from ecomsearch.live.filters import NO_FILTER, FilterColumns, SearchFilter

# --- SearchFilter.parse ---------------------------------------------------------------------


def test_no_values_and_empty_values_filter_nothing() -> None:
    assert SearchFilter.parse() == NO_FILTER and not NO_FILTER.active
    # What a request carries for a query that filters nothing while its neighbours do.
    empty = SearchFilter.parse(category="", brand="", min_price=math.nan, max_price=math.nan)
    assert empty == NO_FILTER and not empty.active


@pytest.mark.parametrize(
    "values",
    [
        {"category": "Tools"},
        {"brand": "Acme"},
        {"min_price": 0.0},
        {"max_price": 0.0},
        {"in_stock_only": True},
    ],
)
def test_any_one_filter_makes_it_active(values: dict) -> None:
    assert SearchFilter.parse(**values).active


def test_category_levels_and_brands_are_folded() -> None:
    parsed = SearchFilter.parse(category="  Power  TOOLS >Drills> ", brand="  ACME   Tools ")
    assert parsed.category == ("power tools", "drills")
    assert parsed.brand == "acme tools"
    # Case folding, not lower-casing: "ß" matches "SS".
    assert SearchFilter.parse(brand="Straße") == SearchFilter.parse(brand="STRASSE")
    # Equal filters are one group in a batch (HybridRetriever searches each group once).
    assert SearchFilter.parse(category="tools > drills") == SearchFilter.parse(
        category="Tools>Drills"
    )


def test_prices_are_kept_and_nan_means_none() -> None:
    parsed = SearchFilter.parse(min_price=2.5, max_price=2.5)  # a single price is fine
    assert (parsed.min_price, parsed.max_price) == (2.5, 2.5)
    only_max = SearchFilter.parse(min_price=math.nan, max_price=10)
    assert (only_max.min_price, only_max.max_price) == (None, 10.0)


@pytest.mark.parametrize("name", [contract.FILTER_CATEGORY, contract.FILTER_BRAND])
def test_a_value_longer_than_the_limit_is_refused(name: str) -> None:
    limit = contract.MAX_FILTER_BYTES
    SearchFilter.parse(**{name: "a" * limit})  # at the limit: fine
    with pytest.raises(RequestError, match=f"{name!r} is longer than {limit} bytes"):
        SearchFilter.parse(**{name: "a" * (limit + 1)})
    # Bytes of UTF-8, not characters.
    with pytest.raises(RequestError, match="longer than"):
        SearchFilter.parse(**{name: "é" * (limit // 2 + 1)})


@pytest.mark.parametrize("name", [contract.FILTER_CATEGORY, contract.FILTER_BRAND])
@pytest.mark.parametrize("value", [" ", "\u200b\ufeff", "\t\n", "\x00"])
def test_a_value_with_nothing_visible_is_refused(name: str, value: str) -> None:
    with pytest.raises(RequestError, match=f"{name!r} has no visible text"):
        SearchFilter.parse(**{name: value})


@pytest.mark.parametrize("category", [">", " > > ", ">>>"])
def test_a_category_of_separators_only_is_refused(category: str) -> None:
    with pytest.raises(RequestError, match="names no category"):
        SearchFilter.parse(category=category)


@pytest.mark.parametrize("name", [contract.FILTER_MIN_PRICE, contract.FILTER_MAX_PRICE])
@pytest.mark.parametrize("value", [-0.01, -1e30, math.inf, -math.inf])
def test_a_negative_or_infinite_price_is_refused(name: str, value: float) -> None:
    with pytest.raises(RequestError, match=f"{name!r} must be a finite price >= 0"):
        SearchFilter.parse(**{name: value})


def test_a_minimum_above_the_maximum_is_refused() -> None:
    with pytest.raises(RequestError, match=f"{contract.FILTER_MIN_PRICE!r} 10.0 exceeds"):
        SearchFilter.parse(min_price=10, max_price=9.99)


# --- FilterColumns against a brute-force predicate -------------------------------------------


@dataclass(frozen=True)
class Item:
    brand: str
    category_path: tuple[str, ...]
    price: float | None
    in_stock: bool


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def passes(item: Item, category: str, brand: str, low, high, in_stock_only: bool) -> bool:
    """The filter's meaning, spelled out: raw request values against one product. Prices
    compare as FP32, the precision they travel in (bounds in requests, prices in results)."""
    if brand and fold(item.brand) != fold(brand):
        return False
    wanted = [fold(level) for level in category.split(">") if level.strip()]
    if [fold(level) for level in item.category_path[: len(wanted)]] != wanted:
        return False
    price = None if item.price is None else np.float32(item.price)
    if low is not None and not (price is not None and price >= np.float32(low)):
        return False
    if high is not None and not (price is not None and price <= np.float32(high)):
        return False
    return not in_stock_only or item.in_stock


BRANDS = ["Acme", "Bosch", "Café Co", "DeWalt", "Black & Decker"]
LEVELS = [["Tools", "Garden", "Power  Tools"], ["Drills", "Saws", "Hoses"], ["Cordless", "Corded"]]
PRICES = [0.0, 4.99, 5.0, 9.99, 10.0, 99.5]  # ties and boundaries


@st.composite
def spelled(draw, text: str) -> str:
    """`text` as someone might type it: other case, extra spaces."""
    variant = draw(st.sampled_from([text, text.upper(), text.lower(), text.swapcase()]))
    return draw(st.sampled_from(["", " ", "  "])) + variant + draw(st.sampled_from(["", " "]))


@st.composite
def items(draw) -> Item:
    brand = draw(st.one_of(st.just(""), st.sampled_from(BRANDS).flatmap(spelled)))
    depth = draw(st.integers(0, len(LEVELS)))
    path = tuple(draw(st.sampled_from(LEVELS[level]).flatmap(spelled)) for level in range(depth))
    price = draw(
        st.one_of(st.none(), st.sampled_from(PRICES), st.floats(0, 200, allow_nan=False, width=32))
    )
    return Item(brand, path, price, draw(st.booleans()))


@st.composite
def raw_filters(draw, catalog: list[Item]) -> dict:
    """Request values for a filter of any kind and selectivity, mostly built from what the
    catalog holds (so they match something), sometimes from what it does not."""
    known = draw(st.sampled_from(catalog))
    category = ""
    if draw(st.booleans()):
        depth = draw(st.integers(1, max(1, len(known.category_path))))
        levels = list(known.category_path[:depth]) or ["Nowhere"]
        if draw(st.integers(0, 9)) == 0:
            levels[-1] = "Nowhere"
        separator = draw(st.sampled_from([" > ", ">", "  >  "]))
        category = separator.join([draw(spelled(level)) for level in levels])
    brand = ""
    if draw(st.booleans()):
        brand = draw(st.sampled_from([known.brand or "Acme", "Nobody"]).flatmap(spelled))
    prices = [i.price for i in catalog if i.price is not None] + PRICES
    bound = st.one_of(st.none(), st.sampled_from(prices), st.floats(0, 200, width=32))
    low, high = draw(bound), draw(bound)
    if low is not None and high is not None and low > high:
        low, high = high, low
    return {
        "category": category,
        "brand": brand,
        "min_price": math.nan if low is None else low,
        "max_price": math.nan if high is None else high,
        "in_stock_only": draw(st.booleans()),
    }


def columns_of(catalog: list[Item], capacity: int = 4) -> FilterColumns:
    columns = FilterColumns(capacity)
    columns.append(
        [i.brand for i in catalog],
        [i.category_path for i in catalog],
        [i.price for i in catalog],
        [i.in_stock for i in catalog],
    )
    return columns


def expected_mask(catalog: list[Item], raw: dict) -> list[bool]:
    low, high = raw["min_price"], raw["max_price"]
    return [
        passes(
            item,
            raw["category"],
            raw["brand"],
            None if math.isnan(low) else low,
            None if math.isnan(high) else high,
            raw["in_stock_only"],
        )
        for item in catalog
    ]


FILTER_SETTINGS = settings(max_examples=60, deadline=None, database=None)


@FILTER_SETTINGS
@given(st.data(), st.lists(items(), min_size=1, max_size=40))
def test_a_mask_is_the_brute_force_predicate(data, catalog: list[Item]) -> None:
    columns = columns_of(catalog)
    for _ in range(5):
        raw = data.draw(raw_filters(catalog))
        mask = columns.mask(SearchFilter.parse(**raw))
        assert mask.dtype == bool and mask.shape == (len(catalog),)
        assert mask.tolist() == expected_mask(catalog, raw), raw


@FILTER_SETTINGS
@given(
    st.data(),
    st.lists(items(), min_size=1, max_size=60),
    st.lists(st.integers(1, 9), min_size=1, max_size=12),
)
def test_rows_appended_in_pieces_mask_as_appended_at_once(
    data, catalog: list[Item], pieces: list[int]
) -> None:
    """Appending grows the columns (from a capacity of 1) without losing or shifting rows,
    and a brand or category first seen in a later piece is found."""
    grown, start = FilterColumns(capacity=1), 0
    for size in pieces:
        piece = catalog[start : start + size]
        grown.append(
            [i.brand for i in piece],
            [i.category_path for i in piece],
            [i.price for i in piece],
            [i.in_stock for i in piece],
        )
        start += len(piece)
        assert grown.count == start
    whole = catalog[:start]
    at_once = columns_of(whole, capacity=len(whole))
    for _ in range(5):
        raw = data.draw(raw_filters(whole))
        search_filter = SearchFilter.parse(**raw)
        assert grown.mask(search_filter).tolist() == expected_mask(whole, raw), raw
        assert at_once.mask(search_filter).tolist() == expected_mask(whole, raw), raw


def test_growth_keeps_every_column() -> None:
    columns = FilterColumns(capacity=1)
    first = Item("Acme", ("Tools", "Drills"), 5.0, False)
    columns.append([first.brand], [first.category_path], [first.price], [first.in_stock])
    rest = [Item("Bosch", ("Garden",), None, True)] * 5
    columns.append(
        [i.brand for i in rest],
        [i.category_path for i in rest],
        [i.price for i in rest],
        [i.in_stock for i in rest],
    )
    assert columns.count == 6
    # The first row's every attribute survived the growth.
    assert columns.mask(SearchFilter.parse(brand="acme")).tolist() == [True] + [False] * 5
    drills = SearchFilter.parse(category="tools > drills")
    assert columns.mask(drills).tolist() == [True] + [False] * 5
    assert columns.mask(SearchFilter.parse(max_price=5)).tolist() == [True] + [False] * 5
    assert columns.mask(SearchFilter.parse(in_stock_only=True)).tolist() == [False] + [True] * 5
    assert sorted(columns.categories()) == [("garden",), ("tools", "drills")]


def test_an_empty_catalog_masks_to_nothing() -> None:
    columns = FilterColumns()
    assert columns.mask(SearchFilter.parse(brand="Acme")).shape == (0,)
    assert columns.mask(NO_FILTER).shape == (0,)


def test_columns_are_appended_together_or_not_at_all() -> None:
    columns = FilterColumns()
    with pytest.raises(ValueError, match="one entry per row"):
        columns.append(["Acme", "Bosch"], [("Tools",)], [1.0, 2.0], [True, True])
    assert columns.count == 0


def test_a_bound_sent_as_fp32_passes_the_product_priced_at_it() -> None:
    """A shopper's "up to 9.99" reaches retrieve as FP32, a hair below 9.99 as a double: the
    product priced 9.99 must still pass (and "from 9.99" too)."""
    bound = float(np.float32(9.99))
    assert bound < 9.99, "test setup: the FP32 value must differ from the decimal"
    columns = columns_of([Item("", (), 9.99, True), Item("", (), 10.0, True)])
    assert columns.mask(SearchFilter.parse(max_price=bound)).tolist() == [True, False]
    assert columns.mask(SearchFilter.parse(min_price=bound)).tolist() == [True, True]
    assert columns.mask(SearchFilter.parse(min_price=9.99, max_price=9.99)).tolist() == [
        True,
        False,
    ]


def test_a_product_without_a_price_fails_every_price_bound() -> None:
    columns = columns_of([Item("", (), None, True), Item("", (), 0.0, True)])
    assert columns.mask(SearchFilter.parse(min_price=0)).tolist() == [False, True]
    assert columns.mask(SearchFilter.parse(max_price=1e9)).tolist() == [False, True]
    assert columns.mask(NO_FILTER).tolist() == [True, True]
    assert np.array_equal(columns.mask(SearchFilter.parse(in_stock_only=True)), [True, True])
