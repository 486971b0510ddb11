"""`ecomsearch bench-freshness`: what live writes cost searches, how soon a write is found, and
what filters cost, measured in one run on a server of its own.

The run never touches a catalog someone serves: it copies the model repository, loads the
catalog into a fresh catalog store (a temporary SQLite file, or an empty database given as
`store_url`, which it then writes to) and starts its own tritonserver over them. Then:

1. search alone: `searchers` closed-loop clients over the benchmark queries for `phase_seconds`;
2. the same searchers, plus one writer sending batches of `write_batch` products through the
   `catalog` model for as long (mostly new products, whose text the model embeds through BLS,
   and price and stock changes of existing ones), plus a prober measuring each new product's
   visibility lag: from its write's acknowledgement until a search for its marker word (a word
   only its title has) first returns it;
3. filtered search at concurrency 1: price ranges cut from the live catalog's price quantiles to
   hold each selectivity, and the brands and category prefixes whose share is nearest to it,
   each against unfiltered search over the same queries (interleaved: each query under every
   filter in turn).

Figures, not assertions: freshness.json and freshness.md, and the report dict returned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.loadtest.load import LoadResult, closed_loop

log = logging.getLogger(__name__)

DEFAULT_SELECTIVITIES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5)
# The writer's mix, per product of a batch: mostly new products, some price and stock changes.
WRITE_MIX = {"new": 0.6, "price": 0.3, "stock": 0.1}
# Closed-loop phases are bounded by time alone.
UNBOUNDED_REQUESTS = 1_000_000_000
# A marker word: "zq" and a number written in base 26 with a fixed count of letters.
MARKER_PREFIX = "zq"
MARKER_LETTERS = 5
NEW_ID_PREFIX = "fresh-"
WARM_UP_ID = f"{NEW_ID_PREFIX}warm-up"
PROBE_TIMEOUT_S = 10.0


class FreshnessError(RuntimeError):
    """The run cannot start as asked (a store that is not empty)."""


@dataclass
class FreshnessSettings:
    searchers: int = 8
    phase_seconds: float = 20.0
    write_batch: int = 10
    selectivities: Sequence[float] = DEFAULT_SELECTIVITIES
    filtered_queries: int = 100
    top_k: int = contract.DEFAULT_TOP_K
    # A new product not found this long after its acknowledgement counts as never visible.
    visibility_cap_s: float = 10.0
    probe_interval_s: float = 0.01
    # Wait after the writes before the filtered phase, so every instance has applied them.
    settle_s: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.searchers < 1 or self.phase_seconds <= 0 or self.filtered_queries < 1:
            raise ValueError("searchers, phase_seconds and filtered_queries must be positive")
        if not 1 <= self.write_batch <= contract.MAX_PRODUCTS_PER_WRITE:
            raise ValueError(f"write_batch must be 1 to {contract.MAX_PRODUCTS_PER_WRITE}")
        if not all(0 < s <= 1 for s in self.selectivities):
            raise ValueError("selectivities are shares of the catalog, in (0, 1]")


# --- Pure parts --------------------------------------------------------------------------------


def marker_word(n: int, letters: int = MARKER_LETTERS) -> str:
    """The n-th marker word: "zq" then n in base 26, as exactly `letters` letters.

    BM25 tokens are runs of letters (ecomsearch.lexical), so a marker is one token, found by
    an exact search for it; the fixed width keeps markers distinct after the lexical plural
    folding (a trailing "s" or "ies" shortens a word, so folded words of different kinds differ
    in length)."""
    if not 0 <= n < 26**letters:
        raise ValueError(f"marker number {n} out of range for {letters} letters")
    digits = []
    for _ in range(letters):
        n, digit = divmod(n, 26)
        digits.append(chr(ord("a") + digit))
    return MARKER_PREFIX + "".join(reversed(digits))


def summarize_ms(values: Iterable[float]) -> dict[str, float | int | None]:
    """Count, p50, p99, max and mean of millisecond values (None for each when there are none);
    percentiles interpolate linearly, as LoadResult's do."""
    array = np.asarray(list(values), dtype=float)
    if not len(array):
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "count": len(array),
        "p50_ms": round(float(np.percentile(array, 50)), 2),
        "p99_ms": round(float(np.percentile(array, 99)), 2),
        "max_ms": round(float(array.max()), 2),
        "mean_ms": round(float(array.mean()), 2),
    }


@dataclass(frozen=True)
class PriceRange:
    low: float
    high: float
    matching: int  # products priced within [low, high]


def price_range(prices: Iterable[float | None], target: int) -> PriceRange:
    """The inclusive range [low, high], both bounds prices of the catalog, holding the number of
    products nearest `target`; of those ranges, the one nearest the median price.

    Prices are compared as FP32, as the server's filter columns and the requests' bounds are, so
    a bound is a price exactly; products without a price never match."""
    priced = np.array([p for p in prices if p is not None], dtype=np.float64)
    if not len(priced):
        raise ValueError("no product has a price")
    order = np.argsort(priced.astype(np.float32), kind="stable")
    values = priced[order].astype(np.float32)
    target = min(max(int(target), 1), len(values))
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    unique = priced[order][first]  # each distinct FP32 price, as a catalog price
    # below[i]: products priced under unique[i]; a range unique[i]..unique[e - 1] holds
    # below[e] - below[i] products.
    below = np.concatenate([[0], np.cumsum(counts)])
    starts = np.arange(len(unique))
    reach = np.minimum(np.searchsorted(below, below[:-1] + target), len(unique))
    # The first end reaching the target, or the one before it (short of it).
    ends = np.concatenate([reach, np.maximum(reach - 1, starts + 1)])
    starts = np.concatenate([starts, starts])
    matching = below[ends] - below[starts]
    off_target = np.abs(matching - target)
    off_median = np.abs(below[starts] + below[ends] - len(values))
    best = np.lexsort((off_median, off_target))[0]
    return PriceRange(
        float(unique[starts[best]]), float(unique[ends[best] - 1]), int(matching[best])
    )


def nearest_by_share(counts: dict[str, int], target: int) -> tuple[str, int]:
    """The key whose count is nearest `target` by ratio (a 0.1% target is nearer 0.05% than
    0.5%); ties to the larger count, then the key."""
    if not counts:
        raise ValueError("nothing to choose from")
    target = max(target, 1)

    def distance(item: tuple[str, int]) -> tuple[float, int, str]:
        key, count = item
        return (abs(math.log(max(count, 1) / target)), -count, key)

    return min(counts.items(), key=distance)


# --- Phase 2: the writer and the prober ----------------------------------------------------------


@dataclass
class NewProduct:
    """A new product's visibility (perf_counter seconds): when its write was acknowledged, when
    the first search for it was sent, and when the first search that returned it was sent and
    answered. The server looked somewhere between that search's sending and its answer, so the
    lag lies between the two figures."""

    product_id: str
    marker: str
    acked_s: float
    probes: int = 0
    first_probe_s: float | None = None
    found_sent_s: float | None = None
    found_returned_s: float | None = None
    given_up: bool = False

    @staticmethod
    def _since(acked_s: float, at_s: float | None) -> float | None:
        return None if at_s is None else (at_s - acked_s) * 1e3

    @property
    def lag_ms(self) -> float | None:
        """Until a search first returned it: the acknowledgement to that search's answer."""
        return self._since(self.acked_s, self.found_returned_s)

    @property
    def lag_to_send_ms(self) -> float | None:
        """The acknowledgement to the sending of that search (a lower figure)."""
        return self._since(self.acked_s, self.found_sent_s)

    @property
    def first_probe_ms(self) -> float | None:
        return self._since(self.acked_s, self.first_probe_s)


def product_record(product: Any) -> dict[str, Any]:
    """An ecomsearch.catalog.Product as the JSON object an upsert sends (the whole product:
    an upsert replaces it)."""
    record = {
        "id": product.id,
        "title": product.title,
        "brand": product.brand,
        "category": product.category,
        "description": product.description,
        "price": product.price,
        "in_stock": product.in_stock,
    }
    return {**product.attributes, **record}


class Writer:
    """One client writing batches back to back until told to stop: new products (a catalog
    product's text with a marker word added to its title), price and stock changes."""

    def __init__(
        self,
        url: str,
        catalog: Sequence[Any],
        batch: int,
        rng: random.Random,
        on_new: Callable[[NewProduct], None],
        write_key: str | None = None,
    ) -> None:
        self.url = url
        self.write_key = write_key
        self.catalog = catalog
        self.batch = batch
        self.rng = rng
        self.on_new = on_new
        self.records: dict[str, dict[str, Any]] = {}  # products changed so far, as last written
        self.ids = [product.id for product in catalog]  # every live id, for the changes
        self.by_id = {product.id: product for product in catalog}
        self.serial = 0
        self.latencies_ms: list[float] = []
        self.products = Counter()  # acknowledged product changes by kind
        self.errors: Counter = Counter()
        self.seconds = 0.0

    def new_product(self) -> tuple[dict[str, Any], str]:
        base = self.rng.choice(self.catalog)
        marker = marker_word(self.serial)
        record = {
            "id": f"{NEW_ID_PREFIX}{self.serial:06d}",
            "title": f"{base.title} {marker}",
            "brand": base.brand,
            "category": base.category,
            "description": base.description,
            "price": base.price,
            "in_stock": True,
        }
        self.serial += 1
        return record, marker

    def changed_product(self, kind: str, taken: set[str]) -> dict[str, Any] | None:
        for _ in range(8):
            product_id = self.rng.choice(self.ids)
            if product_id not in taken:
                break
        else:
            return None
        record = dict(self.records.get(product_id) or product_record(self.by_id[product_id]))
        if kind == "price":
            price = record.get("price") or self.rng.uniform(10, 500)
            record["price"] = round(price * self.rng.uniform(0.8, 1.2), 2)
        else:
            record["in_stock"] = not record.get("in_stock", True)
        return record

    def next_batch(self) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """(records, their kinds, markers of the new ones)."""
        records, kinds, markers, taken = [], [], [], set()
        for kind in self.rng.choices(list(WRITE_MIX), list(WRITE_MIX.values()), k=self.batch):
            record = self.changed_product(kind, taken) if kind != "new" else None
            if record is None:
                kind = "new"
                record, marker = self.new_product()
                markers.append(marker)
            taken.add(record["id"])
            records.append(record)
            kinds.append(kind)
        return records, kinds, markers

    def run(self, stop: threading.Event) -> None:
        from ecomsearch.client import SearchClient, SearchError

        started = time.perf_counter()
        with SearchClient(self.url, write_key=self.write_key) as client:
            while not stop.is_set():
                records, kinds, markers = self.next_batch()
                sent = time.perf_counter()
                try:
                    client.upsert_products(records)
                except SearchError as e:
                    self.errors[f"{type(e).__name__}: {e}"[:200]] += 1
                    stop.wait(0.1)  # all or nothing: none of these was written
                    continue
                acked = time.perf_counter()
                self.latencies_ms.append((acked - sent) * 1e3)
                self.products.update(kinds)
                for record in records:
                    if record["id"] not in self.records and record["id"] not in self.by_id:
                        self.ids.append(record["id"])
                    self.records[record["id"]] = record
                marked = (r for r, k in zip(records, kinds, strict=True) if k == "new")
                for record, marker in zip(marked, markers, strict=True):
                    self.on_new(NewProduct(record["id"], marker, acked))
        self.seconds = time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        products = sum(self.products.values())
        latency = summarize_ms(self.latencies_ms)
        return {
            "writes": len(self.latencies_ms),
            "errors": sum(self.errors.values()),
            "error_messages": dict(self.errors.most_common(5)),
            "products": products,
            "by_kind": {kind: self.products[kind] for kind in WRITE_MIX},
            "seconds": round(self.seconds, 3),
            "products_per_s": round(products / self.seconds, 2) if self.seconds else None,
            "new_products_per_s": (
                round(self.products["new"] / self.seconds, 2) if self.seconds else None
            ),
            "writes_per_s": (
                round(len(self.latencies_ms) / self.seconds, 2) if self.seconds else None
            ),
            "latency_p50_ms": latency["p50_ms"],
            "latency_p99_ms": latency["p99_ms"],
            "latency_max_ms": latency["max_ms"],
        }


class Prober:
    """Polls every `interval_s` with one search per new product not yet seen (sent together,
    in requests of up to 64 queries), until each is found or `cap_s` has passed since its
    acknowledgement; `finish()` lets it stop once nothing is pending."""

    def __init__(self, url: str, k: int, interval_s: float, cap_s: float) -> None:
        self.url, self.k, self.interval_s, self.cap_s = url, k, interval_s, cap_s
        self.products: list[NewProduct] = []
        self._arrivals: list[NewProduct] = []
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self.polls = 0
        self.queries = 0
        self.errors: Counter = Counter()
        self.seconds = 0.0

    def expect(self, product: NewProduct) -> None:
        with self._lock:
            self._arrivals.append(product)

    def finish(self) -> None:
        self._finished.set()

    def run(self) -> None:
        from ecomsearch.client import SearchClient, SearchError

        started = time.perf_counter()
        pending: list[NewProduct] = []
        with SearchClient(self.url, timeout_s=PROBE_TIMEOUT_S) as client:
            while True:
                with self._lock:
                    arrived, self._arrivals = self._arrivals, []
                self.products.extend(arrived)
                pending.extend(arrived)
                now = time.perf_counter()
                for product in pending:
                    product.given_up = now - product.acked_s > self.cap_s
                pending = [p for p in pending if not p.given_up]
                if not pending:
                    with self._lock:
                        done = self._finished.is_set() and not self._arrivals
                    if done:
                        break
                    time.sleep(self.interval_s)
                    continue
                sent = time.perf_counter()
                for product in pending:
                    if product.first_probe_s is None:
                        product.first_probe_s = sent
                try:
                    rows = client.search_batch([p.marker for p in pending], self.k)
                except SearchError as e:
                    self.errors[f"{type(e).__name__}: {e}"[:200]] += 1
                    rows = None
                returned = time.perf_counter()
                self.polls += 1
                self.queries += len(pending)
                if rows is not None:
                    for product, hits in zip(pending, rows, strict=True):
                        product.probes += 1
                        if any(hit.product_id == product.product_id for hit in hits):
                            product.found_sent_s, product.found_returned_s = sent, returned
                    pending = [p for p in pending if p.found_sent_s is None]
                time.sleep(max(0.0, sent + self.interval_s - time.perf_counter()))
        self.seconds = time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        found = [p for p in self.products if p.found_sent_s is not None]
        lag = summarize_ms(p.lag_ms for p in found)
        to_send = summarize_ms(p.lag_to_send_ms for p in found)
        first_probe = summarize_ms(p.first_probe_ms for p in self.products if p.probes)
        return {
            "new_products": len(self.products),
            "visible": len(found),
            "not_visible": len(self.products) - len(found),
            "cap_s": self.cap_s,
            "lag_p50_ms": lag["p50_ms"],
            "lag_p99_ms": lag["p99_ms"],
            "lag_max_ms": lag["max_ms"],
            "lag_mean_ms": lag["mean_ms"],
            "lag_to_send_p50_ms": to_send["p50_ms"],
            "lag_to_send_p99_ms": to_send["p99_ms"],
            "lag_to_send_max_ms": to_send["max_ms"],
            # The measurement's resolution: a product already visible to its first search has
            # a lag no larger than the first search's.
            "found_by_first_probe": sum(p.probes == 1 for p in found),
            "first_probe_p50_ms": first_probe["p50_ms"],
            "first_probe_p99_ms": first_probe["p99_ms"],
            "probe_interval_ms": round(self.interval_s * 1e3, 1),
            "probe_polls": self.polls,
            "probe_queries": self.queries,
            "probe_queries_per_s": round(self.queries / self.seconds, 1) if self.seconds else None,
            "probe_errors": sum(self.errors.values()),
            "probe_error_messages": dict(self.errors.most_common(5)),
        }


# --- Phase 3: filters ----------------------------------------------------------------------------


@dataclass
class FilterRow:
    kind: str  # price, brand, category
    target_selectivity: float
    filters: dict[str, Any]
    matching: int
    selectivity: float
    load: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def filter_columns(products: Sequence[Any]):
    """The server's own filter columns (ecomsearch.live.filters) over the live products, so a
    filter's matching count is what the server's mask holds."""
    from ecomsearch.live.filters import FilterColumns

    columns = FilterColumns(capacity=max(1, len(products)))
    columns.append(
        [p.brand for p in products],
        [p.category_path for p in products],
        [p.price for p in products],
        [p.in_stock for p in products],
    )
    return columns


def matching_count(columns: Any, filters: dict[str, Any]) -> int:
    from ecomsearch.live.filters import SearchFilter

    return int(columns.mask(SearchFilter.parse(**filters)).sum())


def choose_filters(products: Sequence[Any], selectivities: Sequence[float]) -> list[FilterRow]:
    """For each selectivity, a price range from the price quantiles and the brand and category
    prefix nearest to it (a brand or prefix nearest to two selectivities is measured once)."""
    from ecomsearch.catalog import join_category
    from ecomsearch.live.filters import SearchFilter

    columns = filter_columns(products)
    live = len(products)
    brands: dict[str, str] = {}  # folded -> as spelled first
    prefixes: dict[tuple[str, ...], str] = {}
    for product in products:
        if product.brand:
            brands.setdefault(SearchFilter.parse(brand=product.brand).brand, product.brand)
        for depth in range(1, len(product.category_path) + 1):
            text = join_category(product.category_path[:depth])
            prefixes.setdefault(SearchFilter.parse(category=text).category, text)
    brand_counts = {b: matching_count(columns, {"brand": b}) for b in brands.values()}
    category_counts = {c: matching_count(columns, {"category": c}) for c in prefixes.values()}

    rows: list[FilterRow] = []
    seen: set[str] = set()

    def add(kind: str, target: float, filters: dict[str, Any]) -> None:
        key = json.dumps(filters, sort_keys=True)
        if key in seen:
            return
        seen.add(key)
        matching = matching_count(columns, filters)
        rows.append(FilterRow(kind, target, filters, matching, matching / live))

    for target in selectivities:
        bounds = price_range((p.price for p in products), round(target * live))
        add("price", target, {"min_price": bounds.low, "max_price": bounds.high})
    for kind, counts in (("brand", brand_counts), ("category", category_counts)):
        for target in selectivities:
            if counts:
                value, _ = nearest_by_share(counts, round(target * live))
                add(kind, target, {kind: value})
    return rows


@dataclass
class FilteredLoad:
    """One filter's searches: latencies, result counts and failures."""

    latencies_ms: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def load(self, name: str) -> LoadResult:
        seconds = sum(self.latencies_ms) / 1e3  # back to back: the throughput of one client
        return LoadResult(name, 1, np.array(self.latencies_ms), sum(self.errors.values()), seconds)


def measure_filters(
    url: str, queries: Sequence[str], filter_sets: Sequence[dict[str, Any]], k: int
) -> list[FilteredLoad]:
    """Concurrency 1: each query sent under every filter set in turn, then the next query, so a
    drift in the machine's speed (another process, a compaction) touches every set alike."""
    from ecomsearch.client import SearchClient, SearchError

    loads = [FilteredLoad() for _ in filter_sets]
    with SearchClient(url, timeout_s=30.0) as client:
        for query in queries[:3]:  # not measured: a new channel, each filter's first use
            for filters in filter_sets:
                client.search(query, k, **filters)
        for query in queries:
            for filters, load in zip(filter_sets, loads, strict=True):
                began = time.perf_counter()
                try:
                    hits = client.search(query, k, **filters)
                except SearchError as e:
                    load.errors[f"{type(e).__name__}: {e}"[:200]] += 1
                    continue
                load.latencies_ms.append((time.perf_counter() - began) * 1e3)
                load.counts.append(len(hits))
    return loads


# --- The run -------------------------------------------------------------------------------------


def _load_summary(result: LoadResult) -> dict[str, Any]:
    summary = result.summary()
    del summary["system"]
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _search_phase(url, name, queries, settings, admin_headers) -> tuple[LoadResult, dict]:
    from ecomsearch.loadtest.bench import triton_worker_factory
    from ecomsearch.loadtest.triton_stats import breakdown, snapshot

    clients: list = []
    factory = triton_worker_factory(url, contract.SEARCH_MODEL, settings.top_k, clients)
    before = snapshot(url, admin_headers)
    try:
        result = closed_loop(
            name, factory, queries, settings.searchers, UNBOUNDED_REQUESTS, settings.phase_seconds
        )
    finally:
        for client in clients:
            client.close()
    return result, breakdown(before, snapshot(url, admin_headers))


def _check_empty(store_url: str) -> None:
    from ecomsearch.store import open_store

    with open_store(store_url) as store:
        if store.head() != 0 or store.count() != 0:
            raise FreshnessError(
                f"the catalog store {store.url} is not empty ({store.count()} products, at "
                f"change {store.head()}): bench-freshness loads the catalog into a store of its "
                "own and writes to it; give it an empty database"
            )


def _settle(index_dir: Path, seconds: float) -> None:
    """Waits for a compaction a server instance may be running, then `seconds` more, so every
    instance serves every acknowledged write (and any new base) before the next phase."""
    from ecomsearch.live.compaction import compaction_lock

    with compaction_lock(index_dir):
        pass
    time.sleep(seconds)


def run_freshness(
    catalog: Path,
    source_repository: Path,
    cache_dir: Path,
    queries: Sequence[str],
    out_dir: Path,
    settings: FreshnessSettings | None = None,
    store_url: str | None = None,
) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); writes freshness.json and freshness.md
    to `out_dir` and returns the report. `store_url`: an empty catalog store to load and write
    to instead of a temporary SQLite file."""
    settings = settings or FreshnessSettings()
    settings.validate()
    if not queries:
        raise ValueError("no queries")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ecomsearch-freshness-") as workspace:
        report = _run_in(
            Path(workspace), catalog, source_repository, cache_dir, queries, out_dir, settings,
            store_url,
        )  # fmt: skip
    (out_dir / "freshness.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "freshness.md").write_text(freshness_markdown(report))
    return report


def _run_in(
    workspace: Path,
    catalog: Path,
    source_repository: Path,
    cache_dir: Path,
    queries: Sequence[str],
    out_dir: Path,
    settings: FreshnessSettings,
    store_url: str | None,
) -> dict[str, Any]:
    from ecomsearch.catalog import read_catalog
    from ecomsearch.index.builder import build_index
    from ecomsearch.index.manifest import IndexManifest
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.store import open_store, redact
    from ecomsearch.workspace import link_model_repository

    if store_url is None:
        store_url = f"sqlite:///{workspace / 'var' / 'catalog.sqlite3'}"
    _check_empty(store_url)
    repository = link_model_repository(source_repository, workspace / "repository")
    layout = ModelRepositoryLayout(repository)
    built = build_index(catalog, layout, cache_dir=cache_dir, store_url=store_url)
    products = read_catalog(catalog)
    rng = random.Random(settings.seed)
    report: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k != "selectivities"},
            "selectivities": list(settings.selectivities),
            "queries": len(queries),
        },
        "catalog": {
            "path": str(catalog),
            "products": built.manifest.count,
            "index_type": built.manifest.index_type,
            "store": redact(store_url),
        },
        "machine": {"cpus": os.cpu_count()},
    }
    log.info(
        "freshness: %d products (%s index) in %s; starting a server",
        built.manifest.count,
        built.manifest.index_type,
        redact(store_url),
    )
    # Writes need a key, as on any server a network reaches (a random one, for this run only).
    write_key = secrets.token_urlsafe(16)
    with TritonServer.local(
        repository, out_dir / "tritonserver.log", store_url=store_url, write_key=write_key
    ) as srv:
        url = srv.grpc_url
        _warm_up_writes(url, settings, write_key)

        log.info("phase 1: %d searchers for %.0f s", settings.searchers, settings.phase_seconds)
        alone, alone_stages = _search_phase(
            url, "search_alone", queries, settings, srv.admin_headers
        )

        log.info("phase 2: the same searchers, one writer and a prober")
        prober = Prober(url, settings.top_k, settings.probe_interval_s, settings.visibility_cap_s)
        writer = Writer(url, products, settings.write_batch, rng, prober.expect, write_key)
        stop = threading.Event()
        threads = [
            threading.Thread(target=prober.run, name="freshness-prober", daemon=True),
            threading.Thread(target=writer.run, args=(stop,), name="freshness-writer", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            loaded, loaded_stages = _search_phase(
                url, "search_with_writer", queries, settings, srv.admin_headers
            )
        finally:
            stop.set()
            threads[1].join()
            prober.finish()
            threads[0].join(settings.visibility_cap_s + 2 * PROBE_TIMEOUT_S)

        _settle(layout.index_dir, settings.settle_s)
        with open_store(store_url) as store:
            _, live = store.snapshot(with_embeddings=False)
        log.info("phase 3: filtered search over %d live products", len(live))
        report["filtered"] = _filtered_phase(url, queries, live, settings)

    final = IndexManifest.read(layout.index_dir)
    a, b = _load_summary(alone), _load_summary(loaded)
    report.update(
        search_alone=a,
        search_with_writer=b,
        with_writer_vs_alone={
            "throughput": _ratio(b["throughput_rps"], a["throughput_rps"]),
            "p50": _ratio(b["p50_ms"], a["p50_ms"]),
            "p99": _ratio(b["p99_ms"], a["p99_ms"]),
        },
        writes=writer.summary(),
        visibility=prober.summary(),
        stages={"search_alone": alone_stages, "search_with_writer": loaded_stages},
        base_index={
            "built_at_change": built.manifest.catalog_seq,
            "at_change_after_run": final.catalog_seq,
            "compacted_during_run": final.catalog_seq != built.manifest.catalog_seq,
            "products_after_run": final.count,
        },
    )
    return report


def _warm_up_writes(url: str, settings: FreshnessSettings, write_key: str) -> None:
    """One new product written and searched for before anything is measured: the first write
    loads what embedding through BLS needs, and a failure shows here, not as figures."""
    from ecomsearch.client import SearchClient

    marker = MARKER_PREFIX + "warmup"
    with SearchClient(url, timeout_s=30.0, write_key=write_key) as client:
        client.upsert_products([{"id": WARM_UP_ID, "title": f"Warm-up {marker}"}])
        deadline = time.perf_counter() + settings.visibility_cap_s
        while time.perf_counter() < deadline:
            hits = client.search(marker, settings.top_k)
            if any(hit.product_id == WARM_UP_ID for hit in hits):
                return
            time.sleep(0.05)
    log.warning("the warm-up product was not found within %.0f s", settings.visibility_cap_s)


def _filtered_phase(
    url: str, queries: Sequence[str], live: Sequence[Any], settings: FreshnessSettings
) -> dict[str, Any]:
    chosen = [queries[i % len(queries)] for i in range(settings.filtered_queries)]
    k = settings.top_k
    rows = choose_filters(live, settings.selectivities)
    unfiltered, *filtered = measure_filters(url, chosen, [{}, *(r.filters for r in rows)], k)
    baseline = _load_summary(unfiltered.load("unfiltered"))
    for row, load in zip(rows, filtered, strict=True):
        row.load = _load_summary(load.load(row.kind))
        expected = min(k, row.matching)
        row.results = {
            "mean": round(float(np.mean(load.counts)), 2) if load.counts else None,
            "min": min(load.counts, default=None),
            "max": max(load.counts, default=None),
            "expected": expected,
            "short": sum(count < expected for count in load.counts),
            "error_messages": dict(load.errors.most_common(3)),
        }
        row.load["p50_vs_unfiltered"] = _ratio(row.load["p50_ms"], baseline["p50_ms"])
        row.load["p99_vs_unfiltered"] = _ratio(row.load["p99_ms"], baseline["p99_ms"])
        log.info(
            "%-8s %-50s %6d matching (%.4f): p50 %.2f ms, p99 %.2f ms, %s results on average",
            row.kind,
            json.dumps(row.filters),
            row.matching,
            row.selectivity,
            row.load["p50_ms"],
            row.load["p99_ms"],
            row.results["mean"],
        )
    return {
        "concurrency": 1,
        "k": k,
        "queries": len(chosen),
        "live_products": len(live),
        "unfiltered": baseline,
        "rows": [asdict(row) for row in rows],
    }


# --- Report --------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _filter_text(filters: dict[str, Any]) -> str:
    if "min_price" in filters:
        return f"price {filters['min_price']:.2f} to {filters['max_price']:.2f}"
    kind, value = next(iter(filters.items()))
    return f"{kind} `{value}`"


def _stages_markdown(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Per model, both phases side by side: where the writer's work shows."""
    alone, loaded = stages.get("search_alone", {}), stages.get("search_with_writer", {})
    if not alone and not loaded:
        return []
    lines = [
        "",
        "## Per-model time (Triton statistics, mean per request)",
        "",
        "Each cell: search alone / with the writer. The writer's requests to `catalog` embed new "
        "text through `preprocess` and `query_encoder`, whose requests count them too.",
        "",
        "| model | requests | queue ms | compute ms | rows per execution |",
        "|---|---|---|---|---|",
    ]

    def ms(value: float | None) -> float | None:
        return None if value is None else value / 1000

    for model in sorted(set(alone) | set(loaded)):
        a, b = alone.get(model, {}), loaded.get(model, {})
        cells = [f"{_cell(a.get('requests'))} / {_cell(b.get('requests'))}"]
        for key in ("queue_us", "compute_us"):
            cells.append(f"{_cell(ms(a.get(key)))} / {_cell(ms(b.get(key)))}")
        rows = (a.get("rows_per_execution"), b.get("rows_per_execution"))
        cells.append(f"{_cell(rows[0])} / {_cell(rows[1])}")
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return lines


def freshness_markdown(report: dict[str, Any]) -> str:
    s, c = report["settings"], report["catalog"]
    a, b, r = report["search_alone"], report["search_with_writer"], report["with_writer_vs_alone"]
    w, v, f = report["writes"], report["visibility"], report["filtered"]
    lines = [
        "# ecomsearch bench-freshness",
        "",
        f"{c['products']:,} products ({c['index_type']} index) in {c['store']}, "
        f"{report['machine']['cpus']} CPUs. Phases of {s['phase_seconds']:.0f} s, "
        f"{s['searchers']} closed-loop searchers (`search`, k={s['top_k']}), "
        f"{s['queries']} benchmark queries.",
        "",
        "## Search alone, and with one writer",
        "",
        "| phase | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("search alone", a), ("with a writer (and the prober)", b)):
        lines.append(
            f"| {name} | {run['requests']} | {run['errors']} | {run['throughput_rps']:.1f} "
            f"| {run['p50_ms']:.2f} | {run['p99_ms']:.2f} |"
        )
    lines.append(
        f"| with writer / alone | | | {_cell(r['throughput'])} | {_cell(r['p50'])} "
        f"| {_cell(r['p99'])} |"
    )
    kinds = ", ".join(f"{n} {kind}" for kind, n in w["by_kind"].items())
    lines += [
        "",
        f"In phase 2 the prober's searches ran beside the searchers': {v['probe_queries']} "
        f"queries in {v['probe_polls']} requests, {_cell(v['probe_queries_per_s'], 1)} "
        "queries/s.",
        "",
        f"## Writes (batches of {s['write_batch']}, new text embedded through BLS)",
        "",
        "| writes | products | errors | products/s | new products/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| {w['writes']} | {w['products']} ({kinds}) | {w['errors']} "
        f"| {_cell(w['products_per_s'], 1)} | {_cell(w['new_products_per_s'], 1)} "
        f"| {_cell(w['latency_p50_ms'])} | {_cell(w['latency_p99_ms'])} "
        f"| {_cell(w['latency_max_ms'])} |",
        "",
        "## Visibility lag of new products",
        "",
        "From the write's acknowledgement until a search for the product's marker word first "
        "returned it (its answer; `sent`: that search's sending, a lower figure: the server "
        "looked in between). The prober searches for every new product not yet found every "
        f"{v['probe_interval_ms']:.0f} ms, or back to back when a search takes longer; "
        f"{v['found_by_first_probe']} of {v['visible']} were found by their first search, sent "
        f"{_cell(v['first_probe_p50_ms'])} ms (p50) after the acknowledgement. Not found within "
        f"{v['cap_s']:.0f} s: not visible.",
        "",
        "| new products | visible | not visible | p50 ms | p99 ms | max ms | sent p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {v['new_products']} | {v['visible']} | {v['not_visible']} | {_cell(v['lag_p50_ms'])} "
        f"| {_cell(v['lag_p99_ms'])} | {_cell(v['lag_max_ms'])} "
        f"| {_cell(v['lag_to_send_p50_ms'])} / {_cell(v['lag_to_send_p99_ms'])} |",
    ]
    lines += _stages_markdown(report.get("stages", {}))
    base = report["base_index"]
    if base["compacted_during_run"]:
        lines += [
            "",
            f"A server instance compacted the live catalog into a new base index during the run "
            f"(built at change {base['built_at_change']}, at change "
            f"{base['at_change_after_run']} after it).",
        ]
    u = f["unfiltered"]
    lines += [
        "",
        f"## Filtered search (concurrency 1, k={f['k']}, {f['queries']} queries per row, "
        f"{f['live_products']:,} live products)",
        "",
        "Each query is sent unfiltered and under every filter in turn before the next query.",
        "",
        "| filter | target | matching | selectivity | p50 ms | p99 ms | p50 / unfiltered "
        "| results mean / min | short |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| none | | {f['live_products']} | 1 | {u['p50_ms']:.2f} | {u['p99_ms']:.2f} | 1.00 | | |",
    ]
    for row in f["rows"]:
        load, results = row["load"], row["results"]
        lines.append(
            f"| {_filter_text(row['filters'])} | {row['target_selectivity']:.1%} "
            f"| {row['matching']} | {row['selectivity']:.2%} | {load['p50_ms']:.2f} "
            f"| {load['p99_ms']:.2f} | {_cell(load['p50_vs_unfiltered'])} "
            f"| {_cell(results['mean'], 1)} / {_cell(results['min'])} | {results['short']} |"
        )
    lines += [
        "",
        "`short`: queries answered with fewer than min(k, matching) results (exact filters: 0).",
    ]
    return "\n".join(lines) + "\n"
