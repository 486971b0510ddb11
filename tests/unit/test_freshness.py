"""The pure parts of `ecomsearch bench-freshness` (ecomsearch.loadtest.freshness): marker words,
price ranges for a selectivity, the nearest brand or category, percentile summaries, and the
writer's batches. The run itself is in tests/integration/test_loadtest_smoke.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.lexical import tokenize
from ecomsearch.loadtest.freshness import (
    MARKER_LETTERS,
    WRITE_MIX,
    FreshnessError,
    FreshnessSettings,
    Writer,
    choose_filters,
    freshness_markdown,
    marker_word,
    nearest_by_share,
    price_range,
    run_freshness,
    summarize_ms,
)
from ecomsearch.store import ProductWrite, open_store

# --- marker words --------------------------------------------------------------------------------


def test_marker_words_count_in_base_26_with_a_fixed_width() -> None:
    assert marker_word(0) == "zqaaaaa"
    assert marker_word(1) == "zqaaaab"
    assert marker_word(26) == "zqaaaba"
    assert marker_word(26**MARKER_LETTERS - 1) == "zqzzzzz"
    with pytest.raises(ValueError):
        marker_word(26**MARKER_LETTERS)
    with pytest.raises(ValueError):
        marker_word(-1)


def test_each_marker_is_one_bm25_token_and_stays_distinct_after_folding() -> None:
    # Every ending, including the ones plural folding shortens ("...s", "...ies").
    numbers = list(range(3 * 26**3)) + [26**MARKER_LETTERS - n for n in range(1, 2000)]
    tokens = []
    for n in numbers:
        word = marker_word(n)
        assert word.isalpha() and word.islower()
        (token,) = tokenize(f"Lian Li Uni Fan SL-Infinity 3-Pack {word}")[-1:]
        assert tokenize(word) == [token]
        tokens.append(token)
    assert len(set(tokens)) == len(numbers)
    assert any(marker_word(n).endswith("ies") for n in numbers)
    assert any(marker_word(n).endswith("s") and not marker_word(n).endswith("ies") for n in numbers)


# --- price ranges --------------------------------------------------------------------------------


def count_in(prices, low: float, high: float) -> int:
    values = np.array([p for p in prices if p is not None], dtype=np.float32)
    return int(((values >= np.float32(low)) & (values <= np.float32(high))).sum())


@pytest.mark.parametrize("share", [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
def test_price_range_holds_the_target_share_of_distinct_prices(share: float) -> None:
    prices = [round(1 + 0.37 * n, 2) for n in range(10_000)]
    random.Random(3).shuffle(prices)
    target = round(share * len(prices))
    bounds = price_range(prices, target)
    assert bounds.matching == target == count_in(prices, bounds.low, bounds.high)
    assert bounds.low in prices and bounds.high in prices
    # Centred on the median: as many products below the range as above it, give or take one.
    below = sum(p < bounds.low for p in prices)
    above = sum(p > bounds.high for p in prices)
    assert abs(below - above) <= 1


def test_price_range_with_ties_comes_as_near_as_the_ties_allow() -> None:
    # Ten prices, each shared by 100 products: a range holds a multiple of 100.
    prices = [float(10 * (n % 10) + 9.99) for n in range(1000)]
    assert price_range(prices, 100).matching == 100
    assert price_range(prices, 240).matching == 200  # 200 is nearer 240 than 300
    assert price_range(prices, 260).matching == 300
    assert price_range(prices, 1).matching == 100  # no range is narrower than one price
    bounds = price_range(prices, 500)
    assert bounds.matching == count_in(prices, bounds.low, bounds.high) == 500


def test_price_range_is_exact_in_fp32_and_ignores_products_without_a_price() -> None:
    prices = [None, 0.1, 0.2, 0.30000001, 0.3, 1e6 + 0.01, None]
    bounds = price_range(prices, 2)
    assert bounds.matching == 2 == count_in(prices, bounds.low, bounds.high)
    assert price_range(prices, 100).matching == 5  # at most every priced product
    with pytest.raises(ValueError):
        price_range([None, None], 1)


# --- brands and categories -----------------------------------------------------------------------


def test_nearest_by_share_compares_ratios() -> None:
    counts = {"tiny": 5, "small": 50, "half": 500}
    assert nearest_by_share(counts, 10) == ("tiny", 5)  # 2x off, not 5x
    assert nearest_by_share(counts, 30) == ("small", 50)
    assert nearest_by_share(counts, 10_000) == ("half", 500)
    assert nearest_by_share({"a": 10, "b": 40}, 20) == ("b", 40)  # a tie goes to the larger
    with pytest.raises(ValueError):
        nearest_by_share({}, 1)


def catalog(count: int = 1000) -> list[Product]:
    return [
        Product(
            id=f"p{n}",
            title=f"Product {n}",
            brand="Acme" if n % 2 else "Rare" if n == 4 else "Bosch" if n % 4 == 0 else "Makita",
            category=["Tools > Drills", "Tools > Saws > Circular", "Garden"][n % 3],
            price=None if n % 50 == 0 else float(n % 200) + 0.99,
        )
        for n in range(count)
    ]


def test_choose_filters_reports_what_each_filter_matches() -> None:
    products = catalog()
    rows = choose_filters(products, [0.001, 0.1, 0.5])
    by_kind = {kind: [r for r in rows if r.kind == kind] for kind in ("price", "brand", "category")}
    assert [r.target_selectivity for r in by_kind["price"]] == [0.001, 0.1, 0.5]
    for row in rows:
        assert row.selectivity == row.matching / len(products)
    for row in by_kind["price"]:
        low, high = row.filters["min_price"], row.filters["max_price"]
        assert row.matching == count_in([p.price for p in products], low, high)
    # Brands: "Rare" (1 product) for 0.1%, "Bosch" (249) for 10%, "Acme" (half) for 50%.
    brands = {r.filters["brand"]: r.matching for r in by_kind["brand"]}
    assert brands == {"Rare": 1, "Bosch": 249, "Acme": 500}
    # Categories: a prefix counts every path under it ("Tools": 667); of the three paths of
    # 333, "Garden" (first by name) is nearest to 0.1% and to 10% alike, and measured once.
    categories = [(r.filters["category"], r.matching) for r in by_kind["category"]]
    assert categories == [("Garden", 333), ("Tools", 667)]


# --- summaries -----------------------------------------------------------------------------------


def test_summarize_ms() -> None:
    summary = summarize_ms(float(n) for n in range(1, 101))
    assert summary == {
        "count": 100,
        "p50_ms": 50.5,
        "p99_ms": 99.01,
        "max_ms": 100.0,
        "mean_ms": 50.5,
    }
    assert summarize_ms([]) == {
        "count": 0,
        "p50_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "mean_ms": None,
    }


# --- the writer's batches ------------------------------------------------------------------------


def test_writer_batches_are_mostly_new_products_with_unique_ids_and_markers() -> None:
    products = catalog(200)
    writer = Writer("unused:0", products, 10, random.Random(1), on_new=lambda product: None)
    kinds_seen: dict[str, int] = dict.fromkeys(WRITE_MIX, 0)
    markers_seen: set[str] = set()
    for _ in range(100):
        records, kinds, markers = writer.next_batch()
        assert len(records) == 10 == len({r["id"] for r in records})
        new = [r for r, kind in zip(records, kinds, strict=True) if kind == "new"]
        assert len(new) == len(markers)
        for record, marker in zip(new, markers, strict=True):
            assert record["title"].endswith(f" {marker}") and marker not in markers_seen
            assert record["id"].startswith("fresh-")
            markers_seen.add(marker)
        for record, kind in zip(records, kinds, strict=True):
            kinds_seen[kind] += 1
            if kind != "new":  # a whole product (an upsert replaces it), one field changed
                original = next(p for p in products if p.id == record["id"])
                assert record["title"] == original.title
                assert record["brand"] == original.brand
    assert kinds_seen["new"] > kinds_seen["price"] > kinds_seen["stock"] > 0


def test_settings_are_checked() -> None:
    FreshnessSettings().validate()
    for bad in (
        FreshnessSettings(searchers=0),
        FreshnessSettings(write_batch=0),
        FreshnessSettings(write_batch=10_000),
        FreshnessSettings(selectivities=(0.0,)),
    ):
        with pytest.raises(ValueError):
            bad.validate()


def test_a_store_holding_anything_is_refused_before_any_work(tmp_path) -> None:
    # `--store` is written to: a store someone uses (anything in it) must never be.
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    with open_store(url) as store:
        store.upsert([ProductWrite(id="p1", title="Drill")], np.ones((1, 4), np.float32), "enc")
        store.delete(["p1"])  # a store that once held something is not empty either
    with pytest.raises(FreshnessError, match="not empty"):
        run_freshness(
            tmp_path / "missing.jsonl",
            tmp_path / "missing-repository",
            tmp_path / "cache",
            ["drill"],
            tmp_path / "out",
            store_url=url,
        )
    assert not (tmp_path / "out" / "freshness.json").exists()


def test_markdown_renders_a_report() -> None:
    load = {"requests": 10, "errors": 0, "throughput_rps": 5.0, "p50_ms": 2.0, "p99_ms": 4.0}
    report = {
        "settings": {"phase_seconds": 3, "searchers": 2, "top_k": 10, "queries": 3,
                     "write_batch": 5},
        "catalog": {"products": 861, "index_type": "flat", "store": "sqlite:///x"},
        "machine": {"cpus": 2},
        "search_alone": load,
        "search_with_writer": {**load, "throughput_rps": 4.0},
        "with_writer_vs_alone": {"throughput": 0.8, "p50": 1.0, "p99": None},
        "writes": {"writes": 3, "products": 15, "by_kind": {"new": 9, "price": 5, "stock": 1},
                   "errors": 0, "products_per_s": 5.0, "new_products_per_s": 3.0,
                   "latency_p50_ms": 80.0, "latency_p99_ms": 90.0, "latency_max_ms": 91.0},
        "visibility": {"new_products": 9, "visible": 9, "not_visible": 0, "lag_p50_ms": 60.0,
                       "lag_p99_ms": 70.0, "lag_max_ms": 71.0, "lag_to_send_p50_ms": 20.0,
                       "lag_to_send_p99_ms": 30.0, "found_by_first_probe": 7,
                       "first_probe_p50_ms": 5.0, "probe_interval_ms": 10.0,
                       "cap_s": 10.0, "probe_queries": 40, "probe_polls": 8,
                       "probe_queries_per_s": 13.3},
        "base_index": {"compacted_during_run": False},
        "stages": {"search_alone": {"retrieve": {"requests": 10, "queue_us": 100.0,
                                                 "compute_us": 2000.0, "rows_per_execution": 1.5}},
                   "search_with_writer": {"catalog": {"requests": 3, "queue_us": 10.0,
                                                      "compute_us": 90000.0,
                                                      "rows_per_execution": 1.0}}},
        "filtered": {"k": 10, "queries": 10, "live_products": 870, "unfiltered": load,
                     "rows": [{"kind": "brand", "target_selectivity": 0.01,
                               "filters": {"brand": "Acme"}, "matching": 9,
                               "selectivity": 9 / 870,
                               "load": {**load, "p50_vs_unfiltered": 1.1},
                               "results": {"mean": 9.0, "min": 9, "short": 0}}]},
    }  # fmt: skip
    text = freshness_markdown(report)
    assert "| with writer / alone | | | 0.80 | 1.00 | - |" in text
    assert "| brand `Acme` | 1.0% | 9 | 1.03% |" in text
    assert "| 9 | 9 | 0 | 60.00 | 70.00 | 71.00 | 20.00 / 30.00 |" in text
    assert "7 of 9 were found by their first search" in text
    assert "| catalog | - / 3 | - / 0.01 | - / 90.00 | - / 1.00 |" in text
    assert "| retrieve | 10 / - | 0.10 / - | 2.00 / - | 1.50 / - |" in text
