"""`ecomsearch train-recommender`: the recommendation ranker, learned by replaying purchases.

The purchases before the cutoff are split in time: the statistics are built from everything
before the last TRAINING_WINDOW_DAYS, then that window's baskets are replayed in time order.
For each basket of a returning customer the serving code (`Recommender.recommend`) makes the
candidates and features from the state just before it, the basket's products are the labels,
and the basket is then applied, as the served models apply events. The latest baskets of the
window are held out for early stopping. The `similar` blend weight is chosen on the same
window: the weight whose neighbours best predict the other products of each basket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.recommend.candidates import (
    DEFAULT_COPURCHASE_WEIGHT,
    FEATURE_COUNT,
    MAX_CANDIDATES,
    Recommender,
)
from ecomsearch.recommend.interactions import DAY_S, Interactions, event_log_of
from ecomsearch.recommend.metrics import CUTOFF, RecMetrics, basket_metrics
from ecomsearch.recommend.transactions import Basket, Purchases, baskets

log = logging.getLogger(__name__)

TRAINING_WINDOW_DAYS = 28.0
EARLY_STOP_FRACTION = 0.25
COPURCHASE_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SIMILAR_ANCHORS = 1500  # (basket, product) pairs the blend weight is chosen on


def purchase_log(purchases: Purchases, key_of: Mapping[str, int], first_seq: int = 1):
    """The purchases of catalog products as an EventLog (others are left out)."""
    keep = [i for i, product in enumerate(purchases.products) if product in key_of]
    return event_log_of(
        [purchases.customers[i] for i in keep],
        [key_of[purchases.products[i]] for i in keep],
        purchases.timestamps_s[keep],
        first_seq=first_seq,
    )


def apply_basket(interactions: Interactions, basket: Basket, key_of: Mapping[str, int]) -> None:
    keys = [key_of[p] for p in basket.products if p in key_of]
    if keys:
        interactions.apply(
            event_log_of(
                [basket.customer] * len(keys),
                keys,
                [basket.timestamp_s] * len(keys),
                first_seq=interactions.applied_seq + 1,
            )
        )


def key_map(catalog: LiveCatalog) -> dict[str, int]:
    """Product id -> store key of the catalog's live products."""
    rows = np.flatnonzero(catalog.alive)
    ids = catalog.product_ids(rows)
    return {pid.decode("utf-8"): int(key) for pid, key in zip(ids, catalog.keys[rows], strict=True)}


@dataclass
class ReplayExamples:
    """Candidates of replayed baskets, stacked for training (the ExampleSet of the trainer)."""

    invoices: list[str]
    keys: np.ndarray  # [n, MAX_CANDIDATES] int64, -1 pads
    features: np.ndarray  # [n, MAX_CANDIDATES, FEATURE_COUNT] float32
    labels: np.ndarray  # [n, MAX_CANDIDATES] float32: 1 for a product of the basket
    basket_sizes: np.ndarray  # [n]: distinct products of the basket

    def example_set(self, mask: np.ndarray):
        from ecomsearch.ranking.training import ExampleSet

        sizes = np.minimum(self.basket_sizes[mask], 10)
        ideal = np.array([sum(1 / np.log2(np.arange(2, s + 2))) for s in sizes])
        return ExampleSet(
            [invoice for invoice, keep in zip(self.invoices, mask, strict=True) if keep],
            self.keys[mask],
            self.features[mask],
            np.zeros(self.keys[mask].shape, dtype=np.float32),
            self.labels[mask],
            ideal,
        )


def replay_examples(
    recommender: Recommender, window: Sequence[Basket], key_of: Mapping[str, int]
) -> ReplayExamples:
    """Candidates and labels for each returning customer's basket, applying each basket after."""
    interactions = recommender.interactions
    invoices, keys, features, labels, sizes = [], [], [], [], []
    for basket in window:
        history = interactions.user(basket.customer)
        truth = {key_of[p] for p in basket.products if p in key_of}
        if history is not None and history.baskets and truth:
            candidates = recommender.recommend(basket.customer, top_k=CUTOFF)
            width = len(candidates.keys)
            row_keys = np.full(MAX_CANDIDATES, -1, dtype=np.int64)
            row_features = np.zeros((MAX_CANDIDATES, FEATURE_COUNT), dtype=np.float32)
            row_keys[:width], row_features[:width] = candidates.keys, candidates.features
            invoices.append(basket.invoice)
            keys.append(row_keys)
            features.append(row_features)
            labels.append(np.isin(row_keys, list(truth)).astype(np.float32))
            sizes.append(len(basket.products))
        apply_basket(interactions, basket, key_of)
    return ReplayExamples(
        invoices,
        np.array(keys).reshape(-1, MAX_CANDIDATES),
        np.array(features).reshape(-1, MAX_CANDIDATES, FEATURE_COUNT),
        np.array(labels).reshape(-1, MAX_CANDIDATES),
        np.array(sizes),
    )


def choose_copurchase_weight(
    recommender: Recommender,
    window: Sequence[Basket],
    key_of: Mapping[str, int],
    seed: int,
) -> dict[str, Any]:
    """The `similar` blend weight that best predicts a basket's other products from one of
    them (NDCG@20 over sampled anchors, with the statistics as of the window's start)."""
    id_of = {key: product for product, key in key_of.items()}
    anchors = [
        (basket, product)
        for basket in window
        for product in basket.products
        if product in key_of and len(basket.products) > 1
    ]
    rng = np.random.default_rng(seed)
    if len(anchors) > SIMILAR_ANCHORS:
        anchors = [anchors[i] for i in rng.choice(len(anchors), SIMILAR_ANCHORS, replace=False)]
    scores = {}
    for weight in COPURCHASE_WEIGHTS:
        per_anchor = []
        for basket, product in anchors:
            keys, _ = recommender.similar(key_of[product], copurchase_weight=weight)
            ranked = [id_of[key] for key in keys[:CUTOFF].tolist()]
            per_anchor.append(basket_metrics(ranked, set(basket.products) - {product}))
        scores[weight] = RecMetrics.of(per_anchor).as_dict()
        log.info("similar, co-purchase weight %g: %s", weight, scores[weight])
    best = max(COPURCHASE_WEIGHTS, key=lambda w: scores[w][f"ndcg_at_{CUTOFF}"])
    return {"copurchase_weight": best, "anchors": len(anchors), "by_weight": scores}


@dataclass
class TrainRecommenderResult:
    record: dict[str, Any]
    early_stop: dict[str, dict[str, float]]


def train_recommender(
    purchases: Purchases,
    catalog: LiveCatalog,
    cutoff_s: float,
    seed: int = 0,
    window_days: float = TRAINING_WINDOW_DAYS,
):
    """Trains the ranker on the purchases before `cutoff_s`; returns (model, info, the
    similar blend record)."""
    from ecomsearch.ranking.training import train

    started = time.perf_counter()
    key_of = key_map(catalog)
    history = purchases.before(cutoff_s)
    window_start_s = cutoff_s - window_days * DAY_S
    interactions = Interactions()
    interactions.apply(purchase_log(history.before(window_start_s), key_of))
    recommender = Recommender(interactions, catalog)
    window = list(baskets(history.at_or_after(window_start_s)))
    similar = choose_copurchase_weight(recommender, window, key_of, seed)
    examples = replay_examples(recommender, window, key_of)
    n = len(examples.invoices)
    if n < 20:
        raise ValueError(
            f"only {n} baskets of returning customers in the {window_days:g} days before the "
            "cutoff: too few to train on"
        )
    early = np.arange(n) >= int(n * (1 - EARLY_STOP_FRACTION))  # the latest baskets
    fit_set, early_set = examples.example_set(~early), examples.example_set(early)
    model, report = train(fit_set, early_set, seed, relevant_gain=1.0)
    info = {
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cutoff": datetime.fromtimestamp(cutoff_s, timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "window_days": window_days,
        "counts": {
            "purchases_before_cutoff": len(history),
            "window_baskets": len(window),
            "fit_baskets": int((~early).sum()),
            "early_stop_baskets": int(early.sum()),
            "catalog_products": len(key_of),
        },
        "best_epoch": report.best_epoch,
        "epochs_run": report.epochs_run,
        "early_stop_ndcg_at_10": report.best_early_stop_ndcg,
        "similar": similar,
        "seconds": time.perf_counter() - started,
    }
    return model, info


def similar_weight(info_path: Path) -> float:
    """The tuned `similar` blend weight recorded by train-recommender (the default if none)."""
    import json

    try:
        record = json.loads(info_path.read_text())
        return float(record["similar"]["copurchase_weight"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_COPURCHASE_WEIGHT


ONLINE_RETAIL_DESCRIPTION = (
    "UCI Online Retail (Chen, D. (2015), UCI Machine Learning Repository, "
    "DOI 10.24432/C5BW33; CC BY 4.0): real transactions of a UK online giftware retailer."
)


def train_and_export(
    transactions: Path,
    catalog_path: Path,
    cutoff_s: float,
    layout,
    cache_dir: Path,
    export,
    seed: int = 0,
    data_description: str = "",
) -> dict[str, Any]:
    """The whole command: index the catalog (in a workspace of its own), read the purchases,
    train, export the ranker into `layout` with `export` (export.ranker's
    export_recommend_ranker: model, layout, info -> record) and write its model card."""
    from ecomsearch.index.store import CatalogIndex
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.recommend.transactions import read_purchases
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(catalog_path, cache_dir, source=layout.root)
    catalog = LiveCatalog.load(CatalogIndex.load(ModelRepositoryLayout(repository).index_dir))
    purchases = read_purchases(transactions)
    model, info = train_recommender(purchases, catalog, cutoff_s, seed=seed)
    info["training_data"] = {
        "transactions": str(transactions),
        "catalog": str(catalog_path),
        "description": data_description,
    }
    record = export(model, layout, info)
    write_model_card(layout.recommend_ranker_card, record)
    return record


def write_model_card(path: Path, record: dict[str, Any]) -> None:
    from ecomsearch.ranking.model import HIDDEN_UNITS

    counts, similar = record["counts"], record["similar"]
    by_weight = "\n".join(
        f"| {weight} | {metrics['ndcg_at_20']:.4f} | {metrics['recall_at_20']:.4f} |"
        for weight, metrics in similar["by_weight"].items()
    )
    features = "\n".join(f"- `{name}`" for name in record["feature_names"])
    description = record["training_data"].get("description") or "No description was given."
    path.write_text(
        f"""# Recommendation ranker

Scores a shopper's candidate products for `recommend` (written by `ecomsearch
train-recommender`; the figures below are from its record, `1/recommender.json`).

## Model
An MLP ({" -> ".join(map(str, HIDDEN_UNITS))} -> 1, ReLU) over {len(record["feature_names"])}
features, standardised inside the graph; ListNet loss over each basket's candidates. ONNX opset
{record["opset"]}; ONNX Runtime matches PyTorch within {record["max_abs_difference"]:.2g} at
{record["validated_at"]["batch"]} x {record["validated_at"]["candidates"]} (not the traced shape).

Features (computed by `ecomsearch.recommend.candidates`, the same code in training and serving):
{features}

## Training data
{description}

Transactions `{Path(record["training_data"]["transactions"]).name}`, purchases before
{record["cutoff"]} ({counts["purchases_before_cutoff"]:,} rows). Statistics from everything before
the last {record["window_days"]:g} days; that window's {counts["window_baskets"]:,} baskets
replayed in time order: {counts["fit_baskets"]:,} baskets of returning customers to fit,
{counts["early_stop_baskets"]:,} (the latest) for early stopping (NDCG@10
{record["early_stop_ndcg_at_10"]:.4f}, epoch {record["best_epoch"]}).

## `similar` blend
Co-purchase weight {similar["copurchase_weight"]:g}, chosen on {similar["anchors"]:,} (basket,
product) anchors of the window: the other products of the basket are the truth.

| weight | NDCG@20 | Recall@20 |
|---|---|---|
{by_weight}

## Limits
Learned on one shop's purchase histories (giftware, many wholesale customers); the features are
shop-independent, but their weights reflect that shop's habits (repeat purchases dominate).
Measure on your own events with `ecomsearch eval-recs` before relying on it.
"""
    )
