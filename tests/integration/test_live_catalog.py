"""The live catalog end to end, on a real tritonserver, against SQLite and a real PostgreSQL.

Each backend gets its own server (two `retrieve` and two `select` instances, as a deployment
scaled out on a bigger machine runs them; the CPU profile ships one) over its own copy of the
fixture catalog, so the writes here never reach the session server other tests search. In
order: exact filters, a batch with one bad product, shoppers' events shaping `recommend` and
`similar`, compaction under load, two servers on one store, then 16 searchers and one writer at
once followed by kill -9 of the server and a restart.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ecomsearch import contract
from ecomsearch.client import SearchClient, ShopperEvent
from ecomsearch.client.errors import BadRequestError
from ecomsearch.index.builder import build_index
from ecomsearch.index.manifest import IndexManifest
from ecomsearch.live.compaction import compact, compaction_lock
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.server.launcher import TritonServer, signal_group
from ecomsearch.store import open_store
from tests.integration.conftest import copy_model_repository, set_instance_count

# A write acknowledged at t is served by every instance from t + VISIBILITY_WINDOW_S.
VISIBILITY_WINDOW_S = 1.0
SEARCHERS = 16
WRITES_AT_LEAST = 1000  # product changes (a request carries one to four)
K = 5
# The servers here take writes only with it, as a server on a network should.
WRITE_KEY = "live-catalog-write-key"


@dataclass
class LiveServer:
    repository: Path
    store_url: str
    log_dir: Path
    server: TritonServer | None = None
    starts: int = 0

    def start(self) -> TritonServer:
        self.starts += 1
        log_path = self.log_dir / f"tritonserver-{self.starts}.log"
        self.server = TritonServer.local(
            self.repository, log_path, store_url=self.store_url, write_key=WRITE_KEY
        )
        return self.server.start()

    @property
    def grpc_url(self) -> str:
        assert self.server is not None
        return self.server.grpc_url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, tmp_path_factory, fixture_catalog, embedding_cache) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp(f"live-{request.param}")
    repository = copy_model_repository(base / "repository")
    # Two instances of each model that follows the store: every one must see every change.
    for model in (contract.RETRIEVE_MODEL, contract.SELECT_MODEL):
        set_instance_count(repository, model, 2)
    if request.param == "postgresql":
        store_url = request.getfixturevalue("postgres_server").create_database()
    else:
        store_url = f"sqlite:///{base / 'data' / 'catalog.sqlite3'}"
    build_index(
        fixture_catalog,
        ModelRepositoryLayout(repository),
        cache_dir=embedding_cache,
        store_url=store_url,
    )
    live = LiveServer(repository, store_url, base)
    live.start()
    yield live
    if live.server is not None:
        live.server.stop()


def store_state(store_url: str) -> dict[str, dict]:
    with open_store(store_url) as store:
        _, products = store.snapshot(with_embeddings=False)
    return {
        p.id: {
            "brand": p.brand,
            "category_path": p.category_path,
            "price": p.price,
            "in_stock": p.in_stock,
        }
        for p in products
    }


# --- filters ----------------------------------------------------------------------------------


def passes(product: dict, filters: dict) -> bool:
    if "category" in filters:
        levels = [level.casefold() for level in filters["category"].split(" > ")]
        path = [level.casefold() for level in product["category_path"]]
        if path[: len(levels)] != levels:
            return False
    if "brand" in filters and product["brand"].casefold() != filters["brand"].casefold():
        return False
    price = product["price"]
    if "min_price" in filters and (price is None or price < filters["min_price"]):
        return False
    if "max_price" in filters and (price is None or price > filters["max_price"]):
        return False
    return not (filters.get("in_stock") and not product["in_stock"])


def generated_filters(products: dict[str, dict], rng: random.Random) -> list[dict]:
    """Filters of every kind, from one product (0.1%) to about half of the catalog."""
    items = list(products.values())
    prices = sorted(p["price"] for p in items if p["price"] is not None)
    brands = sorted({p["brand"] for p in items if p["brand"]})
    paths = sorted({tuple(p["category_path"]) for p in items if p["category_path"]})
    out: list[dict] = []
    for share in (0.001, 0.01, 0.05, 0.2, 0.5):
        width = max(1, int(share * len(prices)))
        start = rng.randrange(0, len(prices) - width + 1)
        out.append({"min_price": prices[start], "max_price": prices[start + width - 1]})
    out.append({"max_price": prices[len(prices) // 2]})
    out.append({"min_price": prices[-1]})  # the most expensive product(s) only
    for brand in rng.sample(brands, 4):
        out.append({"brand": brand.upper() if rng.random() < 0.5 else brand})
    for path in rng.sample(paths, 3):
        out.append({"category": " > ".join(path[: rng.randint(1, len(path))])})
    out.append({"category": " > ".join(paths[0][:2]), "in_stock": True})
    out.append({"brand": brands[0], "max_price": prices[len(prices) // 2], "in_stock": True})
    out.append({"brand": "no such brand"})
    return out


def test_filters_are_exact_and_return_k_whenever_k_products_pass(live: LiveServer) -> None:
    rng = random.Random(7)
    with SearchClient(live.grpc_url, write_key=WRITE_KEY) as client:
        # Some products out of stock, so the stock filter has something to exclude.
        products = store_state(live.store_url)
        with open_store(live.store_url) as store:
            stored = store.get(rng.sample(sorted(products), 40))
        changed = [
            {
                "id": p.id,
                "title": p.title,
                "brand": p.brand,
                "category_path": list(p.category_path),
                "description": p.description,
                "price": p.price,
                "in_stock": False,
            }
            for p in stored.values()
        ]
        assert client.upsert_products(changed).changed == 40
        time.sleep(VISIBILITY_WINDOW_S)
        products = store_state(live.store_url)
        queries = ["gaming mouse", "nvme ssd 2tb", "quiet case fan", "wireless keyboard"]
        checked = 0
        for filters in generated_filters(products, rng):
            matching = sum(passes(p, filters) for p in products.values())
            for k in (10, contract.MAX_TOP_K):
                query = rng.choice(queries)
                hits = client.search(query, k=k, **filters)
                for hit in hits:
                    assert passes(products[hit.product_id], filters), (filters, hit)
                    assert hit.price == pytest.approx(products[hit.product_id]["price"])
                # Every product is reached by the vector search, so k come back whenever k pass.
                assert len(hits) == min(k, matching), (filters, k, matching)
                checked += 1
        assert checked >= 30


# --- one bad product fails the batch ---------------------------------------------------------


def test_a_batch_with_one_bad_product_writes_nothing(live: LiveServer) -> None:
    with (
        SearchClient(live.grpc_url, write_key=WRITE_KEY) as client,
        open_store(live.store_url) as store,
    ):
        head = store.head()
        good = {"id": "batch-good-1", "title": "Zyxwvut batch good product", "price": 1.0}
        for bad in (
            {"id": "batch-bad-1"},  # no title
            {"id": "batch-bad-2", "title": "Bad price", "price": "cheap"},
            {"id": "batch-bad-3", "title": "x" * (contract.MAX_TITLE_BYTES + 1)},
            {"id": "batch-bad-4", "title": "Bad stock", "in_stock": "yes"},
        ):
            with pytest.raises(BadRequestError):
                client.upsert_products([good, bad])
        assert store.head() == head
        assert store.get(["batch-good-1"]) == {}
        # Without the server's write key nothing is written either.
        with SearchClient(live.grpc_url) as keyless, pytest.raises(BadRequestError, match="key"):
            keyless.upsert_products([good])
        assert store.head() == head
        # Unknown fields are fine: they are kept.
        ack = client.upsert_products([{**good, "colour": "teal", "warranty_years": 2}])
        assert ack.changed == 1 and ack.sequence_number == head + 1
        assert store.get(["batch-good-1"])["batch-good-1"].attributes == {
            "colour": "teal",
            "warranty_years": 2,
        }
        time.sleep(VISIBILITY_WINDOW_S)
        assert [h.product_id for h in client.search("zyxwvut", k=1)] == ["batch-good-1"]
        client.delete_products(["batch-good-1"])


# --- shoppers' events, recommend and similar ------------------------------------------------


def test_events_shape_recommendations_within_a_second_and_a_bad_write_records_nothing(
    live: LiveServer,
) -> None:
    products = store_state(live.store_url)
    rng = random.Random(11)
    ids = sorted(products)
    bought = rng.sample(ids, 3)
    shopper = f"shopper-{rng.randrange(10**6)}"
    with (
        SearchClient(live.grpc_url, write_key=WRITE_KEY) as client,
        open_store(live.store_url) as store,
    ):
        head = store.events_head()
        # A shopper the log has never seen gets the non-personal answer, k of them.
        assert len(client.recommend(shopper, k=10)) == 10
        purchases = [ShopperEvent(shopper, product_id, "purchase") for product_id in bought]
        with pytest.raises(BadRequestError, match="no-such-product"):
            client.record_events([*purchases, ShopperEvent(shopper, "no-such-product", "view")])
        with SearchClient(live.grpc_url) as keyless, pytest.raises(BadRequestError, match="key"):
            keyless.record_events(purchases)
        assert store.events_head() == head
        ack = client.record_events(purchases)  # one write, one time: one basket
        assert (ack.recorded, ack.sequence_number) == (3, head + 3)
        time.sleep(VISIBILITY_WINDOW_S)
        # Their own purchases now lead their recommendations.
        assert set(bought) <= {h.product_id for h in client.recommend(shopper, k=10)}
        # Filters as search's: exact, and k whenever k products pass.
        cheap = {pid for pid, p in products.items() if p["price"] is not None and p["price"] <= 50}
        hits = client.recommend(shopper, k=10, max_price=50.0)
        assert {h.product_id for h in hits} <= cheap and len(hits) == min(10, len(cheap))
        # Bought together: each of the basket's products is similar to the others.
        similar = {h.product_id for h in client.similar(bought[0], k=5)}
        assert set(bought[1:]) <= similar and bought[0] not in similar
        # A product nobody bought still has neighbours (its embedding's).
        unbought = next(pid for pid in ids if pid not in bought)
        assert len(client.similar(unbought, k=5)) == 5
        with pytest.raises(BadRequestError, match="no live product"):
            client.similar("no-such-product")
        # Personalised search: with the shopper's id, what they bought ranks higher; without
        # it, or for a shopper the log does not know, the order is search's own.
        plain = [h.product_id for h in client.search("gaming mouse", k=20)]
        target = plain[9]
        client.record_events([ShopperEvent(f"{shopper}-searcher", target, "purchase")])
        time.sleep(VISIBILITY_WINDOW_S)
        personal = client.search("gaming mouse", k=20, user_id=f"{shopper}-searcher")
        assert [h.product_id for h in personal].index(target) < 9
        for user_id in (None, "a-shopper-nobody-knows"):
            hits = client.search("gaming mouse", k=20, user_id=user_id)
            assert [h.product_id for h in hits] == plain


# --- compaction under load ------------------------------------------------------------------


RECOMMENDERS = ("recommend", "similar")


def switches_logged(log_path: Path, model: str = "retrieve") -> int:
    return log_path.read_text(errors="replace").count(f"{model}: switched to")


def test_compaction_switches_every_instance_without_a_failed_or_empty_search(
    live: LiveServer,
) -> None:
    assert live.server is not None and live.server.log_path is not None
    log_path = live.server.log_path
    with SearchClient(live.grpc_url, write_key=WRITE_KEY) as client:
        ack = client.upsert_products(
            [{"id": "compact-1", "title": "Zyxcompact lamp", "price": 3.5, "in_stock": True}]
        )
    layout = ModelRepositoryLayout(live.repository)
    before = IndexManifest.read(layout.index_dir)
    switched_before = switches_logged(log_path)
    recommenders_before = [switches_logged(log_path, model) for model in RECOMMENDERS]
    stop, failures, empty, searches = threading.Event(), [], [], []

    def search_until_stopped(query: str) -> None:
        with SearchClient(live.grpc_url, timeout_s=10, write_key=WRITE_KEY) as client:
            while not stop.is_set():
                try:
                    hits = client.search(query, k=K)
                except Exception as e:  # every failure is a finding
                    failures.append((query, e))
                    continue
                searches.append(query)
                if not hits:
                    empty.append(query)

    queries = ["gaming mouse", "nvme ssd", "zyxcompact", "case fan", "mechanical keyboard"]
    threads = [threading.Thread(target=search_until_stopped, args=(q,)) for q in queries * 2]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        with compaction_lock(layout.index_dir):
            manifest = compact(layout.index_dir, live.store_url)
        # Both retrieve instances load the new version and switch.
        deadline = time.monotonic() + 30
        while switches_logged(log_path) < switched_before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert switches_logged(log_path) == switched_before + 2
    # The recommenders serve the same index, so they switch too (one instance each).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [
        switches_logged(log_path, model) for model in RECOMMENDERS
    ] != [n + 1 for n in recommenders_before]:
        time.sleep(0.1)
    assert [switches_logged(log_path, m) for m in RECOMMENDERS] == [
        n + 1 for n in recommenders_before
    ]
    assert manifest.catalog_seq is not None and manifest.catalog_seq >= ack.sequence_number
    assert manifest.catalog_seq > (before.catalog_seq or 0)
    assert failures == [] and empty == []
    assert len(searches) > 50
    with SearchClient(live.grpc_url, write_key=WRITE_KEY) as client:  # now in the base, still found
        assert [h.product_id for h in client.search("zyxcompact", k=1)] == ["compact-1"]
        client.delete_products(["compact-1"])


# --- two servers, one store ---------------------------------------------------------------


def test_a_second_server_on_the_same_store_serves_the_first_ones_writes(
    live: LiveServer, tmp_path, fixture_catalog, embedding_cache
) -> None:
    """Several servers share one store (PostgreSQL across machines; on one machine SQLite
    works too): each builds its own index from the store and follows it."""
    repository = copy_model_repository(tmp_path / "repository")
    build_index(
        fixture_catalog,
        ModelRepositoryLayout(repository),
        cache_dir=embedding_cache,
        store_url=live.store_url,
    )
    second = TritonServer.local(
        repository, tmp_path / "tritonserver.log", store_url=live.store_url, write_key=WRITE_KEY
    )
    with second:
        product = {"id": "two-servers-1", "title": "Zyxtwin cable", "price": 5.0}
        with SearchClient(live.grpc_url, write_key=WRITE_KEY) as first_client:
            first_client.upsert_products([product])
        time.sleep(VISIBILITY_WINDOW_S)
        with SearchClient(second.grpc_url, write_key=WRITE_KEY) as second_client:
            (hit,) = second_client.search("zyxtwin", k=1)
            assert (hit.product_id, hit.price) == ("two-servers-1", 5.0)
            # Events too: a purchase recorded through one server shapes the other's answers.
            with SearchClient(live.grpc_url, write_key=WRITE_KEY) as first_client:
                first_client.record_events([ShopperEvent("two-servers-shopper", "two-servers-1")])
            time.sleep(VISIBILITY_WINDOW_S)
            hits = second_client.recommend("two-servers-shopper", k=10)
            assert "two-servers-1" in [h.product_id for h in hits]
            # The other way round, and with the first server stopped: the second serves on.
            assert live.server is not None
            live.server.stop()
            second_client.upsert_products([{**product, "price": 6.0}])
            time.sleep(VISIBILITY_WINDOW_S)
            (hit,) = second_client.search("zyxtwin", k=1)
            assert hit.price == 6.0
            second_client.delete_products(["two-servers-1"])
    live.start()
    time.sleep(VISIBILITY_WINDOW_S)
    with SearchClient(live.grpc_url) as client:  # the restarted first server caught up
        assert "two-servers-1" not in [h.product_id for h in client.search("zyxtwin", k=5)]


# --- 16 searchers, one writer, then kill -9 -------------------------------------------------


def letters(n: int) -> str:
    """A word no catalog has (BM25 tokens are letter runs, so no digits): zq + base 26."""
    digits = []
    for _ in range(4):
        n, digit = divmod(n, 26)
        digits.append(chr(ord("a") + digit))
    return "zq" + "".join(digits)


@dataclass
class Version:
    sent_s: float
    acked_s: float | None
    seq: int | None
    state: dict | None  # None: deleted


@dataclass
class WriteLog:
    versions: dict[str, list[Version]] = field(default_factory=dict)
    sequence_numbers: list[int] = field(default_factory=list)
    changes: int = 0
    known: list[str] = field(default_factory=list)  # ids ever created, for the searchers
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_load(url: str, log: WriteLog, rng: random.Random) -> None:
    """Mixed upserts (new products, price changes, stock changes) and deletes, one request at a
    time, until WRITES_AT_LEAST product changes were acknowledged."""
    live: dict[str, dict] = {}
    serial = 0
    with SearchClient(url, timeout_s=30, write_key=WRITE_KEY) as client:
        while log.changes < WRITES_AT_LEAST:
            kind = rng.choices(["new", "price", "stock", "delete"], [4, 3, 2, 2])[0]
            count = rng.randint(1, 4)
            if kind == "new" or len(live) < 8:
                batch = []
                for _ in range(count):
                    product_id = f"live-{serial}"
                    batch.append(
                        {
                            "id": product_id,
                            "title": f"{letters(serial)} widget",
                            "brand": "Livewire",
                            "category_path": ["Live", "Widgets"],
                            "price": round(rng.uniform(1, 500), 2),
                            "in_stock": True,
                        }
                    )
                    serial += 1
            elif kind in ("price", "stock"):
                batch = []
                for product_id in rng.sample(sorted(live), min(count, len(live))):
                    product = dict(live[product_id])
                    if kind == "price":
                        product["price"] = round(rng.uniform(1, 500), 2)
                    else:
                        product["in_stock"] = not product["in_stock"]
                    batch.append(product)
            else:
                batch = rng.sample(sorted(live), min(count, len(live)))
            sent = time.monotonic()
            if kind == "delete" and len(live) >= 8:
                ack = client.delete_products(batch)
                states = {product_id: None for product_id in batch}
            else:
                ack = client.upsert_products(batch)
                states = {product["id"]: product for product in batch}
            acked = time.monotonic()
            with log.lock:
                for product_id, state in states.items():
                    log.versions.setdefault(product_id, []).append(
                        Version(sent, acked, ack.sequence_number, state)
                    )
                    if state is None:
                        live.pop(product_id, None)
                    else:
                        if product_id not in live:
                            log.known.append(product_id)
                        live[product_id] = state
                log.sequence_numbers.append(ack.sequence_number)
                log.changes += len(states)


@dataclass
class SearchRecord:
    target: str
    started_s: float
    ended_s: float
    hits: list


def search_load(url: str, log: WriteLog, stop: threading.Event, out: list, seed: int) -> None:
    rng = random.Random(seed)
    with SearchClient(url, timeout_s=10, write_key=WRITE_KEY) as client:
        while not stop.is_set():
            with log.lock:
                target = rng.choice(log.known) if log.known else None
            if target is None:
                time.sleep(0.01)
                continue
            query = letters(int(target.split("-")[1]))
            started = time.monotonic()
            hits = client.search(query, k=K)
            out.append(SearchRecord(target, started, time.monotonic(), hits))


@dataclass(frozen=True)
class Window:
    """What a search running over [started_s, ended_s] may show of a product: its last state
    acknowledged a visibility window before the search started (`settled`: absent when there
    is none), or any state sent since then (`recent`)."""

    settled: list[dict | None]
    recent: list[dict | None]

    @classmethod
    def of(cls, versions: list[Version], started_s: float, ended_s: float) -> Window:
        horizon = started_s - VISIBILITY_WINDOW_S
        settled = [v for v in versions if v.acked_s is not None and v.acked_s <= horizon]
        recent = [
            v
            for v in versions
            if (v.acked_s is None or v.acked_s > horizon) and v.sent_s <= ended_s
        ]
        return cls([settled[-1].state] if settled else [], [v.state for v in recent])

    @property
    def states(self) -> list[dict | None]:
        return self.settled + self.recent

    @property
    def must_show(self) -> bool:
        """Live for a whole window and not changed since: every instance serves it."""
        return bool(self.settled) and self.settled[0] is not None and not self.recent


def matches(hit, state: dict | None) -> bool:
    return (
        state is not None
        and math.isclose(hit.price, state["price"], rel_tol=1e-6)
        and hit.in_stock == state["in_stock"]
    )


def check_searches(records: list[SearchRecord], log: WriteLog) -> dict[str, list]:
    problems: dict[str, list] = {"stale or deleted": [], "missing": []}
    for record in records:
        for hit in record.hits:
            versions = log.versions.get(hit.product_id)
            if versions is None:
                continue  # a catalog product (the query's other matches): not written here
            window = Window.of(versions, record.started_s, record.ended_s)
            if not any(matches(hit, state) for state in window.states):
                problems["stale or deleted"].append((record.target, hit, window))
        window = Window.of(log.versions[record.target], record.started_s, record.ended_s)
        if window.must_show and record.target not in [h.product_id for h in record.hits]:
            problems["missing"].append((record.target, window, record.hits))
    return problems


def final_states(log: WriteLog) -> dict[str, dict | None]:
    return {product_id: versions[-1].state for product_id, versions in log.versions.items()}


def check_served(url: str, expected: dict[str, dict | None]) -> list:
    """Every product's last acknowledged state is what search returns for its word."""
    wrong = []
    with SearchClient(url, timeout_s=10, write_key=WRITE_KEY) as client:
        for product_id, state in expected.items():
            hits = client.search(letters(int(product_id.split("-")[1])), k=K)
            found = [h for h in hits if h.product_id == product_id]
            if (state is None) != (not found) or (found and not matches(found[0], state)):
                wrong.append((product_id, state, found))
    return wrong


def test_searches_see_every_write_within_the_window_and_a_kill_9_loses_none(
    live: LiveServer,
) -> None:
    log, stop, records = WriteLog(), threading.Event(), []
    searchers = [
        threading.Thread(target=search_load, args=(live.grpc_url, log, stop, records, seed))
        for seed in range(SEARCHERS)
    ]
    for thread in searchers:
        thread.start()
    try:
        write_load(live.grpc_url, log, random.Random(1))
        time.sleep(VISIBILITY_WINDOW_S + 0.5)  # the searchers go on past the last write
    finally:
        stop.set()
        for thread in searchers:
            thread.join(30)

    assert log.changes >= WRITES_AT_LEAST
    # The searches overlapped the writes (however fast the machine ran either).
    first_sent = min(v.sent_s for versions in log.versions.values() for v in versions)
    last_acked = max(v.acked_s for versions in log.versions.values() for v in versions)
    during = [r for r in records if first_sent <= r.started_s <= last_acked]
    assert len(during) >= 10 * SEARCHERS, f"{len(during)} searches during the writes"
    # Writes are acknowledged in the order they were made, each after the one before.
    assert log.sequence_numbers == sorted(log.sequence_numbers)
    assert len(set(log.sequence_numbers)) == len(log.sequence_numbers)
    problems = check_searches(records, log)
    print({kind: len(found) for kind, found in problems.items()}, "of", len(records))
    for kind, found in problems.items():
        for problem in found[:5]:
            print(kind, problem)
    assert problems == {"stale or deleted": [], "missing": []}

    # Nothing lost or reordered: the store holds each product's last acknowledged state.
    expected = final_states(log)
    stored = store_state(live.store_url)
    for product_id, state in expected.items():
        if state is None:
            assert product_id not in stored
        else:
            assert stored[product_id]["price"] == pytest.approx(state["price"])
            assert stored[product_id]["in_stock"] == state["in_stock"]
    assert check_served(live.grpc_url, expected) == []

    # kill -9 of tritonserver and every stub at once, then a restart over the same store.
    assert live.server is not None and live.server.process is not None
    signal_group(live.server.process.pid, signal.SIGKILL)
    live.server.process.wait(30)
    live.server.stop()
    live.start()
    assert check_served(live.grpc_url, expected) == []
