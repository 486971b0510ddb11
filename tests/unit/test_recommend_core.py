"""The recommendation core (ecomsearch.recommend): the purchase filter and baskets of a
transactions file, the top-k metrics, the baselines, the event log's statistics
(`Interactions`), candidates and features over a real LiveCatalog (`Recommender`) and the
trainer's replay.

Hand-made data where a value is worked out by hand; elsewhere tests/data/online_retail, a tiny
derived subset of the UCI Online Retail data (CC BY 4.0, see its README.md), over a LiveCatalog
built by the real index writer from its products with random embeddings and store keys that are
not the rows (keys start at 1000, in shuffled order), so a row read as a key, or a key as a
row, shows."""

from __future__ import annotations

import csv
import gzip
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.index.builder import CatalogSnapshot, write_index
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.filters import SearchFilter
from ecomsearch.recommend import interactions as interactions_module
from ecomsearch.recommend.baselines import RepeatThenPopular, popular_products
from ecomsearch.recommend.candidates import (
    COPURCHASE_CANDIDATES,
    FEATURE_COUNT,
    FEATURE_NAMES,
    MAX_CANDIDATES,
    NEVER_DAYS,
    OWN_CANDIDATES,
    POPULAR_CANDIDATES,
    SIMILAR_POOL,
    Recommender,
)
from ecomsearch.recommend.interactions import (
    BASKET_WINDOW_S,
    DAY_S,
    POPULARITY_HALF_LIFE_DAYS,
    RECENT_ITEMS,
    Interactions,
    event_log_of,
)
from ecomsearch.recommend.metrics import RecMetrics, basket_metrics
from ecomsearch.recommend.training import (
    apply_basket,
    key_map,
    purchase_log,
    replay_examples,
)
from ecomsearch.recommend.transactions import (
    Basket,
    Purchases,
    TransactionsError,
    baskets,
    evaluation_baskets,
    read_purchases,
)
from ecomsearch.store import EventLog, StoredProduct

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "online_retail"
SAMPLE_TRANSACTIONS = SAMPLE_DIR / "transactions_sample.csv"
SAMPLE_CATALOG = SAMPLE_DIR / "catalog_sample.jsonl"
HEADER = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
DIMENSION = 16
BRANDS = ("Acme", "Bosch", "Makita")
HALF_LIFE_S = POPULARITY_HALF_LIFE_DAYS * DAY_S


def utc_s(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[..., FEATURE_NAMES.index(name)]


# --- transactions ------------------------------------------------------------------------------


def write_transactions(path: Path, rows) -> Path:
    """rows: (InvoiceNo, StockCode, Quantity, InvoiceDate, UnitPrice, CustomerID)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for invoice, code, quantity, date, price, customer in rows:
            writer.writerow([invoice, code, f"ITEM {code}", quantity, date, price, customer, "UK"])
    return path


# The README's list of StockCodes that are not products, with examples of the two prefixes.
NON_PRODUCT_CODES = (
    "POST",
    "D",
    "M",
    "m",
    "DOT",
    "BANK CHARGES",
    "AMAZONFEE",
    "C2",
    "CRUK",
    "PADS",
    "S",
    "B",
    "gift_0001_20",
    "DCGS0003",
    "DCGSSGIRL",
)

# (row, kept?). Each dropped row fails exactly one part of the rule.
FILTER_ROWS = [
    (("500003", "22423", "2", "2011-01-03 09:00:00", "12.75", "12346.0"), True),
    (("500001", "85123A", "6", "2011-01-01 08:26:00", "2.55", "17850.0"), True),
    (("500001", "71053", "6", "2011-01-01 08:26:00", "3.39", "17850.0"), True),
    (("500001", "85123A", "4", "2011-01-01 08:26:00", "2.55", "17850.0"), True),
    (("C500002", "85123A", "1", "2011-01-01 09:00:00", "2.55", "17850.0"), False),
    (("C500002", "71053", "-1", "2011-01-01 09:00:00", "3.39", "17850.0"), False),
    (("500004", "85123A", "1", "2011-01-01 10:00:00", "2.55", ""), False),
    (("500004", "71053", "1", "2011-01-01 10:00:00", "3.39", "   "), False),
    *(
        ((f"5001{i:02d}", code, "1", "2011-01-01 11:00:00", "1.00", "17850.0"), False)
        for i, code in enumerate(NON_PRODUCT_CODES)
    ),
    (("500006", "22423", "0", "2011-01-01 12:00:00", "12.75", "17850.0"), False),
    (("500006", "22423", "-3", "2011-01-01 12:00:00", "12.75", "17850.0"), False),
    (("500006", "22424", "3", "2011-01-01 12:00:00", "0.0", "17850.0"), False),
    (("500006", "22425", "3", "2011-01-01 12:00:00", "-11062.06", "17850.0"), False),
    # Same time, later invoice number first: ties keep file order.
    (("500009", "84406B", "8", "2011-01-02 12:00:00", "2.75", "17850"), True),
    (("500008", "15056BL", "1", "2011-01-02 12:00:00", "5.95", "13047.0"), True),
    (("500007", "79323W", "2", "2011-01-02 07:00:00", "4.25", "13047.0"), True),
]


def test_read_purchases_keeps_exactly_the_purchases_in_time_order(tmp_path: Path) -> None:
    path = write_transactions(tmp_path / "t.csv", [row for row, _ in FILTER_ROWS])
    purchases = read_purchases(path)
    kept = [row for row, keep in FILTER_ROWS if keep]
    order = sorted(range(len(kept)), key=lambda i: utc_s(kept[i][3]))  # stable: file order
    expected = [kept[i] for i in order]
    assert purchases.invoices == [row[0] for row in expected]
    assert purchases.products == [row[1] for row in expected]
    assert purchases.quantities.tolist() == [int(row[2]) for row in expected]
    assert purchases.timestamps_s.tolist() == [utc_s(row[3]) for row in expected]
    assert purchases.customers == ["17850", "17850", "17850", "13047", "17850", "13047", "12346"]
    assert purchases.invoices[3:6] == ["500007", "500009", "500008"]
    assert purchases.quantities.dtype == np.int64 and purchases.timestamps_s.dtype == np.float64
    # The same file gzipped reads the same.
    zipped = tmp_path / "t.csv.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    assert _same_purchases(read_purchases(zipped), purchases)


def _same_purchases(a: Purchases, b: Purchases) -> bool:
    return (
        a.invoices == b.invoices
        and a.customers == b.customers
        and a.products == b.products
        and np.array_equal(a.quantities, b.quantities)
        and np.array_equal(a.timestamps_s, b.timestamps_s)
    )


def test_read_purchases_refuses_missing_columns_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("InvoiceNo,StockCode,Quantity,InvoiceDate,UnitPrice\n1,2,3,4,5\n")
    with pytest.raises(TransactionsError, match="CustomerID"):
        read_purchases(path)
    good = ("500001", "85123A", "6", "2011-01-01 08:26:00", "2.55", "17850.0")
    write_transactions(path, [good, ("500002", "85123A", "6", "yesterday", "2.55", "17850.0")])
    with pytest.raises(TransactionsError, match=":3:"):
        read_purchases(path)
    write_transactions(path, [good, ("500002", "85123A", "six", good[3], "2.55", "17850.0")])
    with pytest.raises(TransactionsError, match=":3:"):
        read_purchases(path)


def read_raw_sample() -> list[dict[str, str]]:
    with open(SAMPLE_TRANSACTIONS, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def purchases() -> Purchases:
    return read_purchases(SAMPLE_TRANSACTIONS)


def test_the_sample_fixture_has_every_kind_of_row_the_filter_drops() -> None:
    rows = read_raw_sample()
    assert list(rows[0]) == list(HEADER)
    assert 1000 < len(rows) < 3000
    assert any(r["InvoiceNo"].startswith("C") for r in rows)
    assert any(not r["CustomerID"] for r in rows)
    assert {"POST", "DOT"} <= {r["StockCode"] for r in rows}
    assert any(r["StockCode"].startswith("gift_") for r in rows)
    assert any(float(r["UnitPrice"]) == 0 and r["CustomerID"] for r in rows)
    assert any(float(r["Quantity"]) < 0 and not r["InvoiceNo"].startswith("C") for r in rows)
    catalog_ids = [json.loads(line)["id"] for line in SAMPLE_CATALOG.read_text().splitlines()]
    assert set(catalog_ids) == {r["StockCode"] for r in rows}


def test_read_purchases_of_the_sample_matches_the_rule_row_by_row(purchases) -> None:
    rows = read_raw_sample()
    expected = [
        r
        for r in rows
        if r["CustomerID"].strip()
        and not r["InvoiceNo"].startswith("C")
        and r["StockCode"] not in NON_PRODUCT_CODES
        and not r["StockCode"].startswith(("gift_", "DCGS"))
        and float(r["Quantity"]) > 0
        and float(r["UnitPrice"]) > 0
    ]
    expected.sort(key=lambda r: r["InvoiceDate"])  # stable, and the file is in time order
    assert purchases.invoices == [r["InvoiceNo"] for r in expected]
    assert purchases.products == [r["StockCode"] for r in expected]
    assert purchases.customers == [r["CustomerID"].removesuffix(".0") for r in expected]
    assert purchases.timestamps_s.tolist() == [utc_s(r["InvoiceDate"]) for r in expected]
    assert np.all(np.diff(purchases.timestamps_s) >= 0)
    assert not any(c.endswith(".0") or not c for c in purchases.customers)
    assert "569716" not in purchases.invoices, "the zero-price row is the invoice's only row"


def test_baskets_group_an_invoices_rows_and_sum_quantities(tmp_path: Path) -> None:
    path = write_transactions(tmp_path / "t.csv", [row for row, _ in FILTER_ROWS])
    got = list(baskets(read_purchases(path)))
    first = utc_s("2011-01-01 08:26:00")
    assert got == [
        Basket("500001", "17850", first, ("85123A", "71053"), (10, 6)),
        Basket("500007", "13047", utc_s("2011-01-02 07:00:00"), ("79323W",), (2,)),
        Basket("500009", "17850", utc_s("2011-01-02 12:00:00"), ("84406B",), (8,)),
        Basket("500008", "13047", utc_s("2011-01-02 12:00:00"), ("15056BL",), (1,)),
        Basket("500003", "12346", utc_s("2011-01-03 09:00:00"), ("22423",), (2,)),
    ]


def test_baskets_of_the_sample_are_its_invoices(purchases) -> None:
    got = list(baskets(purchases))
    assert [b.invoice for b in got] == list(dict.fromkeys(purchases.invoices))
    assert [b.timestamp_s for b in got] == sorted(b.timestamp_s for b in got)
    for basket in got[:: max(1, len(got) // 25)]:
        rows = [i for i, invoice in enumerate(purchases.invoices) if invoice == basket.invoice]
        totals: dict[str, int] = {}
        for i in rows:
            totals[purchases.products[i]] = totals.get(purchases.products[i], 0)
            totals[purchases.products[i]] += int(purchases.quantities[i])
        assert dict(zip(basket.products, basket.quantities, strict=True)) == totals
        assert basket.products == tuple(totals)
        assert {purchases.customers[i] for i in rows} == {basket.customer}


def test_evaluation_baskets_need_an_earlier_purchase(tmp_path: Path) -> None:
    rows = [
        ("1", "A1", "1", "2011-01-01 10:00:00", "1.0", "1.0"),  # customer 1 before the cutoff
        ("2", "A1", "1", "2011-01-10 10:00:00", "1.0", "1.0"),  # kept
        ("3", "A1", "1", "2011-01-06 10:00:00", "1.0", "2.0"),  # 2's first, after the cutoff
        ("4", "A2", "1", "2011-01-08 10:00:00", "1.0", "2.0"),  # kept: 2 bought on the 6th
        ("5", "A1", "1", "2011-01-07 10:00:00", "1.0", "3.0"),  # 3's only invoice
        ("6", "A1", "1", "2011-01-09 10:00:00", "1.0", "4.0"),  # 4's first two invoices, at
        ("7", "A2", "1", "2011-01-09 10:00:00", "1.0", "4.0"),  # one time: neither is later
        ("8", "A1", "1", "2011-01-02 10:00:00", "1.0", "5.0"),  # 5 only before the cutoff
    ]
    purchases = read_purchases(write_transactions(tmp_path / "t.csv", rows))
    kept = evaluation_baskets(purchases, utc_s("2011-01-05 00:00:00"))
    assert [(b.invoice, b.customer) for b in kept] == [("4", "2"), ("2", "1")]


def test_evaluation_baskets_of_the_sample(purchases) -> None:
    cutoff = utc_s("2011-10-20 00:00:00")
    first: dict[str, float] = {}
    for customer, t in zip(purchases.customers, purchases.timestamps_s.tolist(), strict=True):
        first[customer] = min(first.get(customer, math.inf), t)
    expected = [
        b.invoice
        for b in baskets(purchases)
        if b.timestamp_s >= cutoff and first[b.customer] < b.timestamp_s
    ]
    kept = evaluation_baskets(purchases, cutoff)
    assert [b.invoice for b in kept] == expected
    assert any(first[b.customer] >= cutoff for b in kept), "a customer new after the cutoff"
    assert len(kept) < sum(1 for b in baskets(purchases) if b.timestamp_s >= cutoff)


# --- metrics and baselines ----------------------------------------------------------------------


def test_basket_metrics_by_hand() -> None:
    recall, ndcg, hit = basket_metrics(["a", "b", "c", "d"], {"b", "d", "x"}, k=3)
    assert recall == pytest.approx(1 / 3)
    assert ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / 2))
    assert hit == 1.0
    # More truth than k: recall is over k, and two hits in two slots are perfect.
    assert basket_metrics(["x", "y", "q"], {"x", "y", "z", "w"}, k=2) == (1.0, 1.0, 1.0)
    recall, ndcg, hit = basket_metrics(["q", "x", "r"], {"x"}, k=3)
    assert (recall, hit) == (1.0, 1.0) and ndcg == pytest.approx(1 / math.log2(3))
    assert basket_metrics(["q", "r"], {"x", "y"}, k=20) == (0.0, 0.0, 0.0)
    # Only the top k count.
    assert basket_metrics(["q", "r", "x"], {"x"}, k=2) == (0.0, 0.0, 0.0)
    # Shorter than k: the missing slots are misses, the ideal is still min(|truth|, k) hits.
    recall, ndcg, _ = basket_metrics(["x"], {"x", "y"}, k=5)
    assert recall == 0.5 and ndcg == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_rec_metrics_average_over_baskets() -> None:
    metrics = RecMetrics.of([(1.0, 0.5, 1.0), (0.0, 0.0, 0.0), (0.5, 0.25, 1.0)], k=20)
    assert metrics.baskets == 3
    assert metrics.as_dict() == pytest.approx(
        {"baskets": 3, "recall_at_20": 0.5, "ndcg_at_20": 0.25, "hit_rate_at_20": 2 / 3}
    )
    assert RecMetrics.of([]).as_dict()["baskets"] == 0


def basket(invoice: str, customer: str, t: float, *products: str) -> Basket:
    return Basket(invoice, customer, t, tuple(products), tuple(1 for _ in products))


def test_popular_products_by_baskets_then_first_bought() -> None:
    history = [
        basket("1", "u", 1, "c", "a"),
        basket("2", "v", 2, "b", "a"),
        basket("3", "w", 3, "b", "c", "a"),
        basket("4", "u", 4, "d"),
    ]
    assert popular_products(history, 3) == ["a", "c", "b"]
    assert popular_products(history, 10) == ["a", "c", "b", "d"]


def test_repeat_then_popular() -> None:
    baseline = RepeatThenPopular(["p1", "p2", "p3", "p4", "p5"])
    for b in [
        basket("1", "u", 1.0, "x", "p2"),
        basket("2", "u", 2.0, "y"),
        basket("3", "u", 3.0, "x", "z"),
        basket("4", "other", 4.0, "p1", "q"),
    ]:
        baseline.add(b)
    # x in two baskets; z, y, p2 in one each, bought last first; then popular not yet listed.
    assert baseline.recommend("u", 6) == ["x", "z", "y", "p2", "p1", "p3"]
    assert baseline.recommend("u", 8) == ["x", "z", "y", "p2", "p1", "p3", "p4", "p5"]
    assert baseline.recommend("u", 2) == ["x", "z"]
    assert baseline.recommend("stranger", 3) == ["p1", "p2", "p3"]
    assert baseline.recommend("u", 20) == baseline.recommend("u", 8), "nothing more to list"


# --- interactions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The sample's catalog as a LiveCatalog base, and what it was built from."""

    index: CatalogIndex
    lexical: object
    products: dict[int, Product]  # by store key
    vectors: dict[int, np.ndarray]
    key_of: dict[str, int]

    def live(self) -> LiveCatalog:
        return LiveCatalog(self.index, self.lexical)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    records = [json.loads(line) for line in SAMPLE_CATALOG.read_text().splitlines()]
    rng = np.random.default_rng(5)
    keys = (1000 + 7 * rng.permutation(len(records))).tolist()
    products = [
        Product(id=r["id"], title=r["title"], brand=BRANDS[i % 3], price=r["price"])
        for i, r in enumerate(records)
    ]
    vectors = rng.normal(size=(len(records), DIMENSION))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    index_dir = tmp_path_factory.mktemp("recommend") / "index"
    write_index(index_dir, CatalogSnapshot(products, np.array(keys), vectors, "enc", "catalog"))
    index = CatalogIndex.load(index_dir)
    return Sample(
        index,
        index.load_lexical(),
        dict(zip(keys, products, strict=True)),
        dict(zip(keys, vectors, strict=True)),
        {p.id: key for p, key in zip(products, keys, strict=True)},
    )


@pytest.fixture(scope="module")
def sample_log(purchases, sample) -> EventLog:
    return event_log_of(
        purchases.customers,
        [sample.key_of[p] for p in purchases.products],
        purchases.timestamps_s,
    )


def piece(log: EventLog, start: int, end: int) -> EventLog:
    return EventLog(
        seqs=log.seqs[start:end],
        user_ids=log.user_ids[start:end],
        product_ids=log.product_ids[start:end],
        product_keys=log.product_keys[start:end],
        kinds=log.kinds[start:end],
        quantities=log.quantities[start:end],
        timestamps_s=log.timestamps_s[start:end],
    )


def concatenated(*logs: EventLog) -> EventLog:
    return EventLog(
        seqs=np.concatenate([log.seqs for log in logs]),
        user_ids=[u for log in logs for u in log.user_ids],
        product_ids=[p for log in logs for p in log.product_ids],
        product_keys=np.concatenate([log.product_keys for log in logs]),
        kinds=np.concatenate([log.kinds for log in logs]),
        quantities=np.concatenate([log.quantities for log in logs]),
        timestamps_s=np.concatenate([log.timestamps_s for log in logs]),
    )


def padded(values: np.ndarray, size: int) -> np.ndarray:
    """Per-key arrays have a capacity that depends on how they grew: compare them padded."""
    out = np.zeros(size, dtype=values.dtype)
    out[: len(values)] = values
    return out


def sorted_row(interactions: Interactions, key: int) -> tuple[list[int], list[float]]:
    keys, counts = interactions.copurchase.row(key)
    order = np.argsort(keys)
    return keys[order].tolist(), counts[order].tolist()


def assert_same_state(a: Interactions, b: Interactions) -> None:
    assert a.users.keys() == b.users.keys()
    for user_id, mine in a.users.items():
        theirs = b.users[user_id]
        assert mine.items == theirs.items, user_id
        assert list(mine.recent.items()) == list(theirs.recent.items()), user_id
        assert (mine.baskets, mine.last_purchase_s) == (theirs.baskets, theirs.last_purchase_s)
        assert (mine.basket_start_s, mine.basket) == (theirs.basket_start_s, theirs.basket)
    assert (a.clock_s, a.applied_seq, a.events) == (b.clock_s, b.applied_seq, b.events)
    size = max(a.size, b.size)
    for name in ("basket_counts", "buyers", "repeat_buyers"):
        assert np.array_equal(padded(getattr(a, name), size), padded(getattr(b, name), size)), name
    np.testing.assert_allclose(
        padded(a.popularity(), size), padded(b.popularity(), size), rtol=1e-9, atol=0
    )
    bought = np.flatnonzero(padded(a.basket_counts, size))
    assert len(bought)
    for key in bought.tolist():
        assert sorted_row(a, key) == sorted_row(b, key), key


def apply_in_pieces(log: EventLog, sizes=(1, 2, 3, 5, 8, 13, 40, 150)) -> Interactions:
    interactions = Interactions()
    start, step = 0, 0
    while start < len(log):
        end = start + sizes[step % len(sizes)]
        assert interactions.apply(piece(log, start, end)) == len(piece(log, start, end))
        start, step = end, step + 1
    return interactions


def test_applying_the_log_in_pieces_equals_applying_it_at_once(sample_log) -> None:
    at_once = Interactions()
    assert at_once.apply(sample_log) == len(sample_log)
    assert_same_state(apply_in_pieces(sample_log), at_once)
    assert at_once.applied_seq == len(sample_log) and at_once.events == len(sample_log)
    assert at_once.clock_s == sample_log.timestamps_s[-1]
    assert at_once.repeat_buyers.sum() > 0
    assert len(at_once.copurchase.matrix.data) + at_once.copurchase.pending_pairs > 0


def test_events_already_applied_are_skipped(sample_log) -> None:
    at_once = Interactions()
    at_once.apply(piece(sample_log, 0, 800))
    interactions = Interactions()
    assert interactions.apply(piece(sample_log, 0, 500)) == 500
    assert interactions.apply(piece(sample_log, 0, 500)) == 0
    assert interactions.apply(piece(sample_log, 300, 800)) == 300
    assert interactions.applied_seq == 800
    assert_same_state(interactions, at_once)


def test_merging_co_purchases_changes_no_row(sample_log, monkeypatch) -> None:
    monkeypatch.setattr(interactions_module, "MERGE_PAIRS", 10**9)
    unmerged = apply_in_pieces(sample_log)
    assert unmerged.copurchase.matrix.nnz == 0 and unmerged.copurchase.pending
    monkeypatch.setattr(interactions_module, "MERGE_PAIRS", 7)
    merged = apply_in_pieces(sample_log)
    assert merged.copurchase.matrix.nnz > 0
    at_once = Interactions()
    at_once.apply(sample_log)  # big pair arrays go straight into the matrix
    assert not at_once.copurchase.pending
    assert_same_state(merged, unmerged)
    assert_same_state(at_once, unmerged)


def purchase_events(*events: tuple[str, int, float], kind: str = "purchase", first_seq: int = 1):
    users, keys, times = zip(*events, strict=True)
    return event_log_of(users, keys, times, kind=kind, first_seq=first_seq)


def test_purchases_within_the_basket_window_are_one_basket() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    together = Interactions()
    together.apply(purchase_events(("u", 1, t0), ("u", 2, t0 + 600)))
    assert together.users["u"].baskets == 1
    assert sorted_row(together, 1) == ([2], [1.0]) and sorted_row(together, 2) == ([1], [1.0])
    apart = Interactions()
    apart.apply(purchase_events(("u", 1, t0), ("u", 2, t0 + 7200)))
    assert apart.users["u"].baskets == 2
    assert sorted_row(apart, 1) == ([], [])
    assert apart.basket_counts[[1, 2]].tolist() == [1.0, 1.0]
    # The window runs from the basket's first purchase, not its last.
    chained = Interactions()
    step = 0.6 * BASKET_WINDOW_S
    chained.apply(purchase_events(("u", 1, t0), ("u", 2, t0 + step), ("u", 3, t0 + 2 * step)))
    assert chained.users["u"].baskets == 2
    assert sorted_row(chained, 3) == ([], [])
    # Another shopper's purchase in between does not join or split anyone's basket.
    two = Interactions()
    two.apply(purchase_events(("u", 1, t0), ("v", 2, t0 + 60), ("u", 3, t0 + 120)))
    assert two.users["u"].baskets == 1 and sorted_row(two, 1) == ([3], [1.0])


def test_a_product_twice_in_a_basket_counts_once() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    interactions = Interactions()
    interactions.apply(purchase_events(("u", 1, t0), ("u", 2, t0 + 30), ("u", 1, t0 + 60)))
    history = interactions.users["u"]
    assert history.baskets == 1 and history.items[1] == [1, t0]
    assert interactions.basket_counts[1] == 1.0 and interactions.buyers[1] == 1
    assert interactions.repeat_buyers[1] == 0
    assert sorted_row(interactions, 1) == ([2], [1.0])
    # One basket, decayed from its first purchase to the clock (the last event).
    assert interactions.popularity()[1] == pytest.approx(2 ** (-60 / HALF_LIFE_S), rel=1e-12)
    # Bought again the next day: a second basket, a repeat buyer, still one buyer.
    interactions.apply(purchase_events(("u", 1, t0 + DAY_S), first_seq=4))
    assert history.baskets == 2 and history.items[1] == [2, t0 + DAY_S]
    assert interactions.basket_counts[1] == 2.0
    assert (interactions.buyers[1], interactions.repeat_buyers[1]) == (1, 1)
    assert history.last_purchase_s == t0 + DAY_S
    # A third basket: still one buyer who bought it again.
    interactions.apply(purchase_events(("u", 1, t0 + 2 * DAY_S), first_seq=5))
    assert (interactions.buyers[1], interactions.repeat_buyers[1]) == (1, 1)
    assert interactions.basket_counts[1] == 3.0 and history.items[1] == [3, t0 + 2 * DAY_S]


def test_popularity_halves_every_half_life() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    interactions = Interactions()
    interactions.apply(purchase_events(("u", 1, t0)))
    assert interactions.popularity()[1] == pytest.approx(1.0)
    interactions.apply(purchase_events(("v", 2, t0 + HALF_LIFE_S), first_seq=2))
    assert interactions.popularity()[[1, 2]] == pytest.approx([0.5, 1.0], rel=1e-12)
    # A view moves the clock too: both decay.
    interactions.apply(purchase_events(("w", 3, t0 + 3 * HALF_LIFE_S), kind="view", first_seq=3))
    assert interactions.popularity()[[1, 2, 3]] == pytest.approx([0.125, 0.25, 0], rel=1e-12)
    assert interactions.basket_counts[[1, 2, 3]].tolist() == [1.0, 1.0, 0.0]


def test_popularity_over_a_very_long_time_neither_overflows_nor_drifts() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    late = t0 + 600 * HALF_LIFE_S
    events = (("u", 1, t0), ("v", 2, late), ("v", 1, late))
    at_once, stepwise = Interactions(), Interactions()
    at_once.apply(purchase_events(*events))
    for seq, event in enumerate(events, start=1):
        stepwise.apply(purchase_events(event, first_seq=seq))
    for interactions in (at_once, stepwise):
        popularity = interactions.popularity()
        assert np.all(np.isfinite(popularity))
        assert popularity[1] == pytest.approx(1.0 + 2.0**-600, rel=1e-12)
        assert popularity[2] == pytest.approx(1.0, rel=1e-12)


def test_views_and_carts_update_recent_items_but_not_baskets() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    interactions = Interactions()
    interactions.apply(purchase_events(("u", 5, t0), ("u", 6, t0 + 1), kind="view"))
    interactions.apply(purchase_events(("u", 7, t0 + 2), kind="cart", first_seq=3))
    history = interactions.users["u"]
    assert history.recent_keys() == [7, 6, 5]
    assert (history.baskets, history.items, history.last_purchase_s) == (0, {}, -math.inf)
    assert not interactions.basket_counts.any() and not interactions.popularity().any()
    assert interactions.clock_s == t0 + 2 and interactions.events == 3
    interactions.apply(purchase_events(("u", 5, t0 + 3), first_seq=4))
    assert history.recent_keys() == [5, 7, 6] and history.baskets == 1
    assert history.items == {5: [1, t0 + 3]}
    # Only the last RECENT_ITEMS products are kept, most recent first.
    views = [("u", 100 + i, t0 + 10 + i) for i in range(RECENT_ITEMS + 5)]
    interactions.apply(purchase_events(*views, kind="view", first_seq=5))
    assert history.recent_keys(limit=100) == [100 + i for i in range(RECENT_ITEMS + 4, 4, -1)]
    assert history.recent_keys(limit=3) == [124, 123, 122]


def test_co_purchase_cosine_by_hand() -> None:
    t0 = utc_s("2011-01-01 10:00:00")
    interactions = Interactions()
    interactions.apply(
        purchase_events(
            ("a", 1, t0),
            ("a", 2, t0),
            ("b", 1, t0 + 1),
            ("b", 2, t0 + 1),
            ("c", 1, t0 + 2),
            ("c", 3, t0 + 2),
            ("d", 2, t0 + 3),
        )
    )
    # Baskets holding 1: 3, holding 2: 3, holding 3: 1; both 1 and 2: 2; both 1 and 3: 1.
    keys, scores = interactions.copurchase_scores(1)
    assert keys.tolist() == [2, 3]
    assert scores == pytest.approx([2 / 3, 1 / math.sqrt(3)])
    keys, scores = interactions.copurchase_scores(1, shrink=1.0)
    assert scores == pytest.approx([2 / 3 * 2 / 3, 1 / math.sqrt(3) * 1 / 2])
    keys, scores = interactions.copurchase_scores(3)
    assert keys.tolist() == [1] and scores == pytest.approx([1 / math.sqrt(3)])
    for never in (4, 10_000):
        keys, scores = interactions.copurchase_scores(never)
        assert len(keys) == len(scores) == 0


# --- candidates --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_interactions(sample_log) -> Interactions:
    interactions = Interactions()
    interactions.apply(sample_log)
    return interactions


@pytest.fixture(scope="module")
def recommender(sample: Sample, sample_interactions: Interactions) -> Recommender:
    """Read-only: tests that change the catalog build their own."""
    return Recommender(sample_interactions, sample.live())


def expected_popular(interactions: Interactions, keys: list[int]) -> list[int]:
    def rank(key: int):
        if key >= interactions.size:
            return (0.0, 0.0, key)
        return (-interactions.popularity()[key], -interactions.basket_counts[key], key)

    return sorted(keys, key=rank)


def biggest_buyer(interactions: Interactions) -> str:
    return max(sorted(interactions.users), key=lambda u: len(interactions.users[u].items))


def own_order(history) -> list[int]:
    """The own-products source: most baskets, then bought last, first; OWN_CANDIDATES of them."""
    items = history.items
    return sorted(items, key=lambda k: (-items[k][0], -items[k][1]))[:OWN_CANDIDATES]


def test_an_unknown_user_gets_the_popular_products(recommender: Recommender, sample) -> None:
    expected = expected_popular(recommender.interactions, list(sample.products))
    assert len(set(recommender.interactions.basket_counts[expected[:40]].tolist())) > 5
    for top_k in (10, 80):
        candidates = recommender.recommend("nobody", top_k=top_k)
        assert candidates.keys.tolist() == expected[: max(POPULAR_CANDIDATES, top_k)]
        features = candidates.features
        assert not column(features, "user_bought_before").any()
        assert column(features, "user_item_days_since_log") == pytest.approx(np.log1p(NEVER_DAYS))
        popularity = recommender.interactions.popularity()[candidates.keys]
        assert column(features, "popularity_recent_log") == pytest.approx(
            np.log1p(popularity), rel=1e-6
        )
    assert recommender.popular(5, None).tolist() == expected[:5]


def test_with_no_events_yet_there_are_still_k_candidates(sample: Sample) -> None:
    recommender = Recommender(Interactions(), sample.live())
    live = sorted(sample.products)
    for top_k in (10, 60):
        candidates = recommender.recommend("nobody", top_k=top_k)
        assert candidates.keys.tolist() == live[: max(POPULAR_CANDIDATES, top_k)]
        assert candidates.features.shape == (len(candidates.keys), FEATURE_COUNT)
        assert np.all(np.isfinite(candidates.features))
        assert not column(candidates.features, "popularity_total_log").any()


def test_a_users_own_products_are_candidates_with_their_history(recommender) -> None:
    interactions = recommender.interactions
    user = biggest_buyer(interactions)
    history = interactions.users[user]
    assert len(history.items) > 20 and history.baskets > 3
    own = own_order(history)
    candidates = recommender.recommend(user)
    keys, features = candidates.keys.tolist(), candidates.features
    assert keys[: len(own)] == own, "own products first, most baskets then most recent"
    bought = np.array([key in history.items for key in keys])
    assert np.array_equal(column(features, "user_bought_before"), bought)
    counts = np.array([history.items[k][0] if k in history.items else 0 for k in keys])
    assert column(features, "user_item_baskets_log") == pytest.approx(np.log1p(counts), rel=1e-6)
    assert column(features, "user_item_share") == pytest.approx(counts / history.baskets, rel=1e-6)
    days = [(interactions.clock_s - history.items[k][1]) / DAY_S for k in own]
    assert column(features, "user_item_days_since_log")[: len(own)] == pytest.approx(
        np.log1p(days), rel=1e-5, abs=1e-6
    )
    assert column(features, "user_baskets_log") == pytest.approx(math.log1p(history.baskets))
    recent = set(history.recent)
    assert np.array_equal(column(features, "recently_seen"), [k in recent for k in keys])
    # Somebody else's candidates do not say this user's products were bought.
    other = recommender.recommend("nobody")
    assert not column(other.features, "user_bought_before").any()


def seed_with_partners(recommender: Recommender, count: int = 2) -> list[int]:
    """Live products with the most co-purchase partners."""
    catalog = recommender.catalog
    live = [k for k in catalog.keys.tolist() if catalog.row_of(k) is not None]
    return sorted(live, key=lambda k: (-len(recommender.copurchase_scores(k)[0]), k))[:count]


def test_recent_keys_drive_the_co_purchase_and_embedding_features(recommender, sample) -> None:
    seeds = seed_with_partners(recommender)
    plain = recommender.recommend("nobody")
    for name in ("copurchase_sum", "copurchase_max", "embedding_max", "embedding_mean"):
        assert not column(plain.features, name).any(), name
    candidates = recommender.recommend("nobody", recent_keys=seeds)
    keys, features = candidates.keys.tolist(), candidates.features
    scores = []
    for seed in seeds:
        partners, shrunk = recommender.copurchase_scores(seed)
        scores.append(dict(zip(partners.tolist(), shrunk.tolist(), strict=True)))
    expected_sum = [sum(s.get(k, 0.0) for s in scores) for k in keys]
    expected_max = [max(s.get(k, 0.0) for s in scores) for k in keys]
    assert column(features, "copurchase_sum") == pytest.approx(expected_sum, rel=1e-5, abs=1e-7)
    assert column(features, "copurchase_max") == pytest.approx(expected_max, rel=1e-5, abs=1e-7)
    assert max(expected_sum) > 0
    # The products bought most with the seeds are candidates (those clear of a tie at the cut).
    totals = {k: sum(s.get(k, 0.0) for s in scores) for s in scores for k in s}
    ranked = sorted(totals.values(), reverse=True)
    cut = ranked[COPURCHASE_CANDIDATES] if len(ranked) > COPURCHASE_CANDIDATES else -1.0
    best = {k for k, total in totals.items() if total > cut + 1e-9}
    assert len(best) > 10 and best <= set(keys)
    assert np.array_equal(column(features, "recently_seen"), [k in seeds for k in keys])
    vectors = np.stack([sample.vectors[k] for k in keys])
    seed_vectors = np.stack([sample.vectors[s] for s in seeds])
    centre = seed_vectors.mean(axis=0)
    centre /= np.linalg.norm(centre)
    assert column(features, "embedding_max") == pytest.approx(
        (vectors @ seed_vectors.T).max(axis=1), abs=1e-5
    )
    assert column(features, "embedding_mean") == pytest.approx(vectors @ centre, abs=1e-5)
    # The seeds' embedding neighbours are candidates too.
    nearest = sorted(sample.vectors, key=lambda k: -float(sample.vectors[k] @ centre))[:5]
    assert set(nearest) <= set(keys)


def test_a_filter_holds_for_every_candidate(recommender, sample) -> None:
    user = biggest_buyer(recommender.interactions)
    prices = sorted({p.price for p in sample.products.values()})
    cheap = {"max_price": (prices[9] + prices[10]) / 2}
    very_cheap = {"max_price": (prices[1] + prices[2]) / 2}
    for raw, passes in [
        (cheap, lambda p: p.price <= cheap["max_price"]),
        (very_cheap, lambda p: p.price <= very_cheap["max_price"]),
        ({"brand": "acme"}, lambda p: p.brand == "Acme"),
        ({"brand": "Bosch", "max_price": 2.0}, lambda p: p.brand == "Bosch" and p.price <= 2.0),
        ({"brand": "Nobody"}, lambda p: False),
    ]:
        search_filter = SearchFilter.parse(**raw)
        matching = {k for k, p in sample.products.items() if passes(p)}
        seeds = seed_with_partners(recommender)
        for user_id, recent in ((user, ()), ("nobody", ()), ("nobody", seeds)):
            for top_k in (10, 60):
                candidates = recommender.recommend(user_id, recent, search_filter, top_k)
                keys = candidates.keys.tolist()
                assert set(keys) <= matching, raw
                assert len(keys) >= min(top_k, len(matching)), (raw, user_id, top_k)
                assert len(keys) == len(set(keys))
                assert candidates.features.shape == (len(keys), FEATURE_COUNT)
        own = set(own_order(recommender.interactions.users[user]))
        assert own & matching <= set(recommender.recommend(user, (), search_filter).keys.tolist())


def delete(catalog: LiveCatalog, sample: Sample, keys: list[int]) -> None:
    """Applies the store's tombstones of `keys` to the catalog."""
    first = catalog.applied_seq + 1
    changes = [
        StoredProduct(key=k, id=sample.products[k].id, seq=first + i, deleted=True, title="")
        for i, k in enumerate(keys)
    ]
    assert catalog.apply(changes) == len(keys)


def test_deleted_products_are_never_candidates(sample: Sample, sample_interactions) -> None:
    catalog = sample.live()
    recommender = Recommender(sample_interactions, catalog)
    user = biggest_buyer(sample_interactions)
    history = sample_interactions.users[user]
    own = sorted(history.items, key=lambda k: -history.items[k][0])
    seed = seed_with_partners(recommender, 1)[0]
    partners, scores = recommender.copurchase_scores(seed)
    popular = expected_popular(sample_interactions, list(sample.products))
    best_partners = partners[np.argsort(-scores)[:5]].tolist()
    gone = [*own[:5], *popular[:5], *best_partners, *history.recent_keys(3)]
    gone = [k for k in dict.fromkeys(gone) if k != seed]
    delete(catalog, sample, gone)
    assert all(catalog.row_of(k) is None for k in gone)
    gone_set = set(gone)
    for user_id in (user, "nobody", *sorted(sample_interactions.users)[:5]):
        for recent in ((), (seed,), (gone[0], seed)):
            for search_filter in (SearchFilter(), SearchFilter.parse(max_price=3.0)):
                keys = recommender.recommend(user_id, recent, search_filter).keys.tolist()
                assert not gone_set & set(keys), (user_id, recent)
                assert keys
    for weight in (0.0, 1.0, 8.0):
        keys, _ = recommender.similar(seed, copurchase_weight=weight)
        assert not gone_set & set(keys.tolist())
    alive = [k for k in popular if k not in gone_set]
    assert recommender.recommend("nobody").keys.tolist() == alive[:POPULAR_CANDIDATES]
    assert set(key_map(catalog).values()) == set(sample.products) - gone_set


def test_features_are_finite_and_complete(recommender, sample) -> None:
    users = [*sorted(recommender.interactions.users), "nobody"]
    seeds = seed_with_partners(recommender, 3)
    for i, user_id in enumerate(users):
        recent = seeds[: i % 4]
        search_filter = SearchFilter.parse(max_price=4.0) if i % 3 == 0 else SearchFilter()
        candidates = recommender.recommend(user_id, recent, search_filter, top_k=20)
        keys, features = candidates.keys, candidates.features
        assert keys.dtype == np.int64 and features.dtype == np.float32
        assert features.shape == (len(keys), FEATURE_COUNT) and len(FEATURE_NAMES) == FEATURE_COUNT
        assert 20 <= len(keys) <= MAX_CANDIDATES and len(set(keys.tolist())) == len(keys)
        assert np.all(np.isfinite(features)), user_id
        assert set(keys.tolist()) <= set(sample.products)


def neighbours_by_cosine(sample: Sample, anchor: int, live: set[int]) -> list[tuple[int, float]]:
    vector = sample.vectors[anchor].astype(np.float64)
    scored = [(k, float(sample.vectors[k] @ vector)) for k in sorted(live) if k != anchor]
    return sorted(scored, key=lambda item: -item[1])


def test_similar_with_weight_zero_is_the_embedding_order(recommender, sample) -> None:
    live = set(sample.products)
    for anchor in sorted(sample.products)[::15]:
        keys, scores = recommender.similar(anchor, copurchase_weight=0.0)
        expected = neighbours_by_cosine(sample, anchor, live)[:SIMILAR_POOL]
        assert keys.tolist() == [k for k, _ in expected]
        assert scores == pytest.approx([s for _, s in expected], abs=1e-5)


def test_similar_never_returns_the_anchor_and_blends_co_purchases(recommender, sample) -> None:
    live = set(sample.products)
    moved_up = 0
    for anchor in sorted(sample.products):
        partners, shrunk = recommender.copurchase_scores(anchor)
        blend = dict(zip(partners.tolist(), shrunk.tolist(), strict=True))
        plain_keys = recommender.similar(anchor, copurchase_weight=0.0)[0].tolist()
        for weight in (1.0, 4.0):
            keys, scores = recommender.similar(anchor, copurchase_weight=weight)
            keys = keys.tolist()
            assert anchor not in keys and len(keys) == len(set(keys))
            assert np.all(np.diff(scores) <= 1e-6)
            cosine = dict(neighbours_by_cosine(sample, anchor, live))
            expected = [cosine[k] + weight * blend.get(k, 0.0) for k in keys]
            assert scores == pytest.approx(expected, abs=1e-5)
            top_partners = sorted(blend, key=lambda k: -blend[k])[:SIMILAR_POOL]
            assert set(keys) == set(plain_keys) | set(top_partners) - {anchor}
        if blend:
            # The product bought most with the anchor gains the most: nothing below it in
            # cosine order can pass it, so it ranks at least as high as without co-purchases.
            best = max(blend, key=lambda k: blend[k])
            plain_rank = [k for k, _ in neighbours_by_cosine(sample, anchor, live)].index(best)
            blended = recommender.similar(anchor, copurchase_weight=1.0)[0].tolist()
            assert blended.index(best) <= plain_rank, anchor
            moved_up += blended.index(best) < plain_rank
    assert moved_up > 20


# --- training replay ---------------------------------------------------------------------------


def basket_log(window: list[Basket], key_of: dict[str, int], first_seq: int) -> EventLog:
    users, keys, times = [], [], []
    for b in window:
        for product in b.products:
            if product in key_of:
                users.append(b.customer)
                keys.append(key_of[product])
                times.append(b.timestamp_s)
    return event_log_of(users, keys, times, first_seq=first_seq)


def test_replay_labels_the_basket_and_leaves_the_state_of_applying_it(purchases, sample) -> None:
    catalog = sample.live()
    key_of = key_map(catalog)
    # Not every product is in the catalog: those purchases are left out everywhere.
    for product in sorted(key_of)[:3]:
        del key_of[product]
    window_start = utc_s("2011-10-25 00:00:00")
    before = purchase_log(purchases.before(window_start), key_of)
    window = list(baskets(purchases.at_or_after(window_start)))
    interactions = Interactions()
    interactions.apply(before)
    recommender = Recommender(interactions, catalog)
    examples = replay_examples(recommender, window, key_of)

    seen = {u for u, k in zip(before.user_ids, before.product_keys.tolist(), strict=True)}
    expected_invoices = []
    for b in window:
        truth = {key_of[p] for p in b.products if p in key_of}
        if truth and b.customer in seen:
            expected_invoices.append(b.invoice)
        if truth:
            seen.add(b.customer)
    assert examples.invoices == expected_invoices
    n = len(expected_invoices)
    assert n > 30
    assert examples.keys.shape == (n, MAX_CANDIDATES)
    assert examples.features.shape == (n, MAX_CANDIDATES, FEATURE_COUNT)
    assert np.all(np.isfinite(examples.features))
    by_invoice = {b.invoice: b for b in window}
    for row, invoice in enumerate(examples.invoices):
        b = by_invoice[invoice]
        truth = {key_of[p] for p in b.products if p in key_of}
        keys = examples.keys[row]
        assert examples.labels[row].tolist() == [float(k in truth) for k in keys.tolist()]
        assert examples.basket_sizes[row] == len(b.products)
        width = int((keys >= 0).sum())
        assert np.all(keys[:width] >= 0) and np.all(keys[width:] == -1)
        assert not examples.features[row, width:].any()
    assert examples.labels.sum() > n, "the candidates hold many basket products"

    reference = Interactions()
    reference.apply(before)
    reference.apply(basket_log(window, key_of, reference.applied_seq + 1))
    assert_same_state(interactions, reference)


def test_replay_candidates_are_made_from_the_state_just_before_the_basket(
    purchases, sample
) -> None:
    catalog = sample.live()
    key_of = key_map(catalog)
    window_start = utc_s("2011-11-01 00:00:00")
    before = purchase_log(purchases.before(window_start), key_of)
    window = list(baskets(purchases.at_or_after(window_start)))
    interactions = Interactions()
    interactions.apply(before)
    examples = replay_examples(Recommender(interactions, catalog), window, key_of)
    assert len(examples.invoices) > 5
    position = {b.invoice: i for i, b in enumerate(window)}
    for row in (0, len(examples.invoices) // 2, len(examples.invoices) - 1):
        invoice = examples.invoices[row]
        state = Interactions()
        state.apply(before)
        for b in window[: position[invoice]]:
            apply_basket(state, b, key_of)
        fresh = Recommender(state, catalog).recommend(window[position[invoice]].customer, top_k=20)
        width = len(fresh.keys)
        assert examples.keys[row, :width].tolist() == fresh.keys.tolist()
        assert np.array_equal(examples.features[row, :width], fresh.features)


@pytest.mark.parametrize(
    "text",
    ["2011-12-09 12:50:00", "2011-12-09T12:50:00", "12/9/2011 12:50", "12/09/2011 12:50:00"],
)
def test_invoice_dates_in_iso_or_the_spreadsheets_layout_are_read_as_utc(text: str) -> None:
    from ecomsearch.recommend.transactions import parse_time_s

    assert parse_time_s(text) == 1323435000.0  # 2011-12-09 12:50:00 UTC


def test_an_invoice_date_that_is_no_date_is_refused() -> None:
    from ecomsearch.recommend.transactions import parse_time_s

    with pytest.raises(ValueError, match="not a date"):
        parse_time_s("yesterday")
