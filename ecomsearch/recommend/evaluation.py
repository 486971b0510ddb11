"""`ecomsearch eval-recs`: recommendation quality on a time split, measured through the served
system, with the events replayed as they would arrive.

One command, end to end: it trains what the recommender needs on the purchases before the
cutoff (as `train-recommender` does), indexes the catalog into a fresh catalog store in a model
repository of its own, records the purchases before the cutoff in that store's event log,
starts its own tritonserver, replays, and stops what it started. Protocol:

- purchases: ecomsearch.recommend.transactions (customer, not a cancellation, quantity and price
  above 0, a product StockCode);
- test baskets: the invoices at or after the cutoff by customers with a purchase before the
  invoice's time, in time order; truth is the basket's distinct products;
- each basket asks the served `recommend` for K products for its customer; Recall@K = hits /
  min(basket size, K), NDCG@K with binary gain, HitRate@K;
- "frozen": no events after the cutoff; "real-time": after each basket is scored, its purchases
  go through the served `events` API, so later baskets see them (frozen runs first: the
  real-time replay changes the store);
- baselines in the same harness: popularity (top K by baskets before the cutoff) and repeat +
  popularity (the customer's products by baskets, then popularity), each knowing what the served
  system knows in that mode;
- `similar` on held-out co-purchases: for sampled (test basket, product) anchors, the truth is
  the basket's other products; the served `similar` against pure embedding neighbours of the
  same index;
- latency: recommend and event writes during the replay (p50/p99), and `search` at concurrency
  1 on the same server for comparison;
- personalised search, in the real-time replay: for one product of each basket (seeded), the
  query a shopper could type for it (the last two words of its title, "t-light holder") is
  sent to `search` without and with the customer's id; MRR@10 of that product.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.recommend.baselines import RepeatThenPopular, popular_products
from ecomsearch.recommend.metrics import CUTOFF, RecMetrics, basket_metrics
from ecomsearch.recommend.transactions import (
    Basket,
    Purchases,
    baskets,
    evaluation_baskets,
    read_purchases,
)

log = logging.getLogger(__name__)

DEFAULT_SIMILAR_ANCHORS = 1000
DEFAULT_SEARCH_PROBES = 300
EVENTS_PER_WRITE = 100_000  # bulk load of the history into the fresh store
CLIENT_TIMEOUT_S = 30.0


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"count": 0}
    values = np.asarray(seconds) * 1000
    return {
        "count": len(values),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
    }


def load_history(store, purchases: Purchases) -> int:
    """Records purchases in the store's event log as they happened; returns how many."""
    from ecomsearch.store import Event

    events = [
        Event(customer, product, "purchase", timestamp_s, max(1, min(quantity, 1_000_000)))
        for customer, product, quantity, timestamp_s in zip(
            purchases.customers,
            purchases.products,
            purchases.quantities.tolist(),
            purchases.timestamps_s.tolist(),
            strict=True,
        )
    ]
    for start in range(0, len(events), EVENTS_PER_WRITE):
        store.record_events(events[start : start + EVENTS_PER_WRITE])
    return len(events)


def basket_events(basket: Basket, known: set[str]) -> list[dict[str, Any]]:
    return [
        {
            "user_id": basket.customer,
            "product_id": product,
            "kind": "purchase",
            "quantity": max(1, min(quantity, contract.MAX_EVENT_QUANTITY)),
            "timestamp_s": basket.timestamp_s,
        }
        for product, quantity in zip(basket.products, basket.quantities, strict=True)
        if product in known
    ]


SEARCH_CUTOFF = 10


def product_query(title: str) -> str:
    """What a shopper could type for a product: the last two words of its title."""
    return " ".join(title.lower().split()[-2:])


def reciprocal_rank(ranked: list[str], product: str, k: int = SEARCH_CUTOFF) -> float:
    top = ranked[:k]
    return 1.0 / (top.index(product) + 1) if product in top else 0.0


def replay(
    client,
    test: list[Basket],
    history: Purchases,
    known: set[str],
    popular: list[str],
    realtime: bool,
    k: int = CUTOFF,
    titles: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One replay of the test baskets through the served `recommend`, with the baselines; with
    `titles` (real-time), personalised search too."""
    repeat = RepeatThenPopular(popular)
    for basket in baskets(history):
        repeat.add(basket)
    scored: dict[str, list] = {"recommend": [], "repeat_then_popular": [], "popular": []}
    recommend_s, events_s, sent = [], [], 0
    rng = np.random.default_rng(seed)
    searched: dict[str, list[float]] = {"search": [], "search_with_user_id": []}
    search_s: dict[str, list[float]] = {name: [] for name in searched}
    bought_before = 0
    for basket in test:
        if titles is not None:
            products = [p for p in basket.products if p in known]
            if products:
                product = products[int(rng.integers(len(products)))]
                query = product_query(titles[product])
                for name, user_id in (("search", None), ("search_with_user_id", basket.customer)):
                    started = time.perf_counter()
                    hits = client.search(query, SEARCH_CUTOFF, user_id=user_id)
                    search_s[name].append(time.perf_counter() - started)
                    ranked = [h.product_id for h in hits]
                    searched[name].append(reciprocal_rank(ranked, product))
                bought_before += product in repeat.counts.get(basket.customer, {})
        truth = set(basket.products)
        started = time.perf_counter()
        hits = client.recommend(basket.customer, k)
        recommend_s.append(time.perf_counter() - started)
        scored["recommend"].append(basket_metrics([h.product_id for h in hits], truth, k))
        scored["repeat_then_popular"].append(
            basket_metrics(repeat.recommend(basket.customer, k), truth, k)
        )
        scored["popular"].append(basket_metrics(popular, truth, k))
        if realtime:
            events = basket_events(basket, known)
            if events:
                started = time.perf_counter()
                client.record_events(events, timeout_s=CLIENT_TIMEOUT_S)
                events_s.append(time.perf_counter() - started)
                sent += len(events)
            repeat.add(
                Basket(
                    basket.invoice,
                    basket.customer,
                    basket.timestamp_s,
                    tuple(p for p in basket.products if p in known),
                    (),
                )
            )
    report = {
        "metrics": {name: RecMetrics.of(rows, k).as_dict() for name, rows in scored.items()},
        "events_sent": sent,
        "latency": {
            "recommend": _percentiles_ms(recommend_s),
            "record_events": _percentiles_ms(events_s),
        },
    }
    if titles is not None:
        queries = len(searched["search"])
        report["personalised_search"] = {
            "queries": queries,
            "bought_before": bought_before,
            f"mrr_at_{SEARCH_CUTOFF}": {
                name: float(np.mean(values)) if values else 0.0 for name, values in searched.items()
            },
            "latency": {name: _percentiles_ms(values) for name, values in search_s.items()},
        }
    return report


def evaluate_similar(
    client, recommender, test: list[Basket], known: set[str], anchors: int, seed: int
) -> dict[str, Any]:
    """The served `similar` against pure embedding neighbours (the same index, in-process) on
    held-out co-purchases: anchor product -> the basket's other products."""
    candidates = [
        (basket, product)
        for basket in test
        if len(basket.products) > 1
        for product in basket.products
        if product in known
    ]
    rng = np.random.default_rng(seed)
    if len(candidates) > anchors:
        candidates = [candidates[i] for i in rng.choice(len(candidates), anchors, replace=False)]
    catalog = recommender.catalog
    served, embedding, seconds = [], [], []
    for basket, product in candidates:
        truth = set(basket.products) - {product}
        started = time.perf_counter()
        hits = client.similar(product, CUTOFF)
        seconds.append(time.perf_counter() - started)
        served.append(basket_metrics([h.product_id for h in hits], truth))
        keys, _ = recommender.similar(catalog.key_of_id(product), copurchase_weight=0.0)
        ids = catalog.product_ids_of_keys(keys[:CUTOFF])
        embedding.append(basket_metrics([i.decode("utf-8") for i in ids], truth))
    return {
        "anchors": len(candidates),
        "metrics": {
            "similar": RecMetrics.of(served).as_dict(),
            "embedding_neighbours": RecMetrics.of(embedding).as_dict(),
        },
        "latency": {"similar": _percentiles_ms(seconds)},
    }


def search_latency(client, titles: list[str], probes: int, seed: int) -> dict[str, float]:
    """`search` at concurrency 1 on the same server: the first words of product titles."""
    rng = np.random.default_rng(seed)
    queries = [" ".join(titles[i].split()[:3]) for i in rng.choice(len(titles), probes)]
    seconds = []
    for query in queries:
        started = time.perf_counter()
        client.search(query, CUTOFF)
        seconds.append(time.perf_counter() - started)
    return _percentiles_ms(seconds)


def run_eval_recs(
    transactions: Path,
    catalog_path: Path,
    cutoff_s: float,
    out_dir: Path,
    cache_dir: Path,
    source_repository: Path,
    export: Callable,
    seed: int = 0,
    limit: int | None = None,
    similar_anchors: int = DEFAULT_SIMILAR_ANCHORS,
    search_probes: int = DEFAULT_SEARCH_PROBES,
) -> dict[str, Any]:
    """The whole command (see the module docstring); writes recs.json and recs.md to out_dir.
    `export` is export.ranker's export_recommend_ranker."""
    from datetime import datetime, timezone

    from ecomsearch.catalog import read_catalog
    from ecomsearch.client import SearchClient
    from ecomsearch.index.builder import build_index
    from ecomsearch.index.store import CatalogIndex
    from ecomsearch.live.catalog import LiveCatalog
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.recommend.candidates import Recommender
    from ecomsearch.recommend.interactions import Interactions
    from ecomsearch.recommend.training import key_map, purchase_log, train_recommender
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.store import open_store
    from ecomsearch.workspace import link_model_repository

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    layout = ModelRepositoryLayout(link_model_repository(source_repository, work / "repository"))
    store_url = f"sqlite://{(work / 'store.sqlite3').resolve()}"

    products = read_catalog(catalog_path)
    titles = [product.title for product in products]
    purchases = read_purchases(transactions)
    history = purchases.before(cutoff_s)
    known = {product.id for product in products}
    history_known = history.restricted_to(known)
    test = evaluation_baskets(purchases, cutoff_s)
    if limit is not None:
        test = test[:limit]
    if not test:
        raise ValueError("no test baskets: nothing at or after the cutoff by a returning customer")
    log.info(
        "%d purchases before the cutoff (%d of catalog products), %d test baskets",
        len(history),
        len(history_known),
        len(test),
    )

    build_index(catalog_path, layout, cache_dir=cache_dir, store_url=store_url)
    with open_store(store_url) as store:
        loaded = load_history(store, history_known)
    catalog = LiveCatalog.load(CatalogIndex.load(layout.index_dir))
    model, info = train_recommender(purchases, catalog, cutoff_s, seed=seed)
    info["training_data"] = {"transactions": str(transactions), "catalog": str(catalog_path)}
    export(model, layout, info)
    # The in-process recommender the embedding-only `similar` baseline runs on.
    interactions = Interactions()
    interactions.apply(purchase_log(history_known, key_map(catalog)))
    recommender = Recommender(interactions, catalog)
    popular = popular_products(baskets(history), CUTOFF)

    write_key = secrets.token_urlsafe(16)
    server = TritonServer.local(
        layout.root, out_dir / "tritonserver.log", store_url=store_url, write_key=write_key
    ).start()
    try:
        with SearchClient(server.grpc_url, timeout_s=CLIENT_TIMEOUT_S, write_key=write_key) as c:
            frozen = replay(c, test, history_known, known, popular, realtime=False)
            log.info("frozen: %s", frozen["metrics"])
            similar = evaluate_similar(c, recommender, test, known, similar_anchors, seed)
            log.info("similar: %s", similar["metrics"])
            search = search_latency(c, titles, search_probes, seed)
            realtime = replay(
                c,
                test,
                history_known,
                known,
                popular,
                realtime=True,
                titles={product.id: product.title for product in products},
                seed=seed,
            )
            log.info("real-time: %s", realtime["metrics"])
    finally:
        server.stop()

    ndcg = f"ndcg_at_{CUTOFF}"
    served, baseline = (
        realtime["metrics"]["recommend"][ndcg],
        realtime["metrics"]["repeat_then_popular"][ndcg],
    )
    report = {
        "transactions": str(transactions),
        "catalog": str(catalog_path),
        "cutoff": datetime.fromtimestamp(cutoff_s, timezone.utc).isoformat(timespec="seconds"),
        "k": CUTOFF,
        "counts": {
            "purchases_before_cutoff": len(history),
            "events_loaded": loaded,
            "catalog_products": len(known),
            "test_baskets": len(test),
        },
        "training": {key: info[key] for key in ("counts", "best_epoch", "similar", "seconds")},
        "frozen": frozen,
        "realtime": realtime,
        "similar": similar,
        "search_latency": search,
        "summary": {
            "ndcg_gain_over_repeat_then_popular": served / baseline - 1 if baseline else None,
            "realtime_minus_frozen_ndcg": served - frozen["metrics"]["recommend"][ndcg],
            "recommend_p50_over_search_p50": (
                frozen["latency"]["recommend"]["p50_ms"] / search["p50_ms"]
            ),
            "personalised_search_mrr_gain": _gain(
                realtime["personalised_search"][f"mrr_at_{SEARCH_CUTOFF}"]
            ),
        },
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "recs.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (out_dir / "recs.md").write_text(markdown)
    print(markdown)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _gain(mrr: dict[str, float]) -> float | None:
    plain = mrr["search"]
    return mrr["search_with_user_id"] / plain - 1 if plain else None


def render_markdown(report: dict[str, Any]) -> str:
    k = report["k"]
    rows = []
    for mode in ("frozen", "realtime"):
        for name, m in report[mode]["metrics"].items():
            rows.append(
                f"| {mode} | {name} | {m[f'recall_at_{k}']:.4f} | {m[f'ndcg_at_{k}']:.4f} | "
                f"{m[f'hit_rate_at_{k}']:.4f} | {m['baskets']} |"
            )
    similar_rows = [
        f"| {name} | {m[f'recall_at_{k}']:.4f} | {m[f'ndcg_at_{k}']:.4f} | "
        f"{m[f'hit_rate_at_{k}']:.4f} | {m['baskets']} |"
        for name, m in report["similar"]["metrics"].items()
    ]
    latency = report["realtime"]["latency"]
    frozen_latency = report["frozen"]["latency"]["recommend"]
    search = report["search_latency"]
    summary = report["summary"]
    gain = summary["ndcg_gain_over_repeat_then_popular"]
    personal = report["realtime"]["personalised_search"]
    personal_mrr = personal[f"mrr_at_{SEARCH_CUTOFF}"]
    return "\n".join(
        [
            f"# Recommendations: {Path(report['transactions']).name}, cutoff {report['cutoff']}",
            "",
            f"{report['counts']['test_baskets']} test baskets, top {k}.",
            "",
            f"| mode | recommender | Recall@{k} | NDCG@{k} | HitRate@{k} | baskets |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Real-time NDCG@{k} over repeat + popularity: "
            + ("n/a" if gain is None else f"{gain:+.1%}")
            + f"; real-time minus frozen: {summary['realtime_minus_frozen_ndcg']:+.4f}.",
            "",
            f"## similar ({report['similar']['anchors']} held-out co-purchase anchors)",
            "",
            f"| neighbours | Recall@{k} | NDCG@{k} | HitRate@{k} | anchors |",
            "|---|---|---|---|---|",
            *similar_rows,
            "",
            "## Latency (concurrency 1, client to client)",
            "",
            "| call | p50 ms | p99 ms | count |",
            "|---|---|---|---|",
            f"| search | {search['p50_ms']:.2f} | {search['p99_ms']:.2f} | {search['count']} |",
            f"| recommend (frozen) | {frozen_latency['p50_ms']:.2f} | "
            f"{frozen_latency['p99_ms']:.2f} | {frozen_latency['count']} |",
            f"| recommend (real-time) | {latency['recommend']['p50_ms']:.2f} | "
            f"{latency['recommend']['p99_ms']:.2f} | {latency['recommend']['count']} |",
            f"| record_events | {latency['record_events'].get('p50_ms', float('nan')):.2f} | "
            f"{latency['record_events'].get('p99_ms', float('nan')):.2f} | "
            f"{latency['record_events']['count']} |",
            "",
            f"recommend p50 / search p50: {summary['recommend_p50_over_search_p50']:.2f}",
            "",
            "## Personalised search (real-time replay)",
            "",
            f"{personal['queries']} queries (the last two words of a basket product's title), "
            f"{personal['bought_before']} of them for a product the customer had bought before.",
            "",
            f"| search | MRR@{SEARCH_CUTOFF} of the product bought | p50 ms | p99 ms |",
            "|---|---|---|---|",
            *(
                f"| {name} | {value:.4f} | {personal['latency'][name]['p50_ms']:.2f} | "
                f"{personal['latency'][name]['p99_ms']:.2f} |"
                for name, value in personal_mrr.items()
            ),
            "",
        ]
    )
