"""Candidates and their features for a user (`recommend`) or a product (`similar`), from the
event log's statistics and the live catalog's embeddings. The served models and the trainer
call the same code, so the ranker learns on exactly the features it is served.

Products are named by their store keys, as everywhere between the serving models; the live
catalog says which keys are live, pass a filter, and what their embeddings and prices are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.filters import NO_FILTER, SearchFilter
from ecomsearch.recommend.interactions import DAY_S, Interactions, UserHistory

# Candidate sources for `recommend`, each at most this many products.
OWN_CANDIDATES = 100  # the user's own purchases, most baskets (then most recent) first
COPURCHASE_CANDIDATES = 100  # bought with the user's recent products
EMBEDDING_CANDIDATES = 30  # nearest the user's recent products
POPULAR_CANDIDATES = 50  # most popular now (decayed), also the whole answer for a new user
MAX_CANDIDATES = 256  # the union's cap: the width the ranker scores
# Recent products that seed co-purchase and embedding features.
SEED_ITEMS = 10
# "Days since" for something that never happened: beyond any real gap in the data.
NEVER_DAYS = 3650.0
# Co-purchase cosine is shrunk towards 0 for pairs seen in few baskets (c / (c + shrink)): one
# shared basket between two rarely bought products is not evidence they go together.
COPURCHASE_SHRINK = 1.0
# `similar`: embedding neighbours and co-purchases considered, each.
SIMILAR_POOL = 100
DEFAULT_COPURCHASE_WEIGHT = 1.0

FEATURE_NAMES = (
    "user_item_baskets_log",  # log1p(baskets of this user holding the product)
    "user_item_share",  # that, over the user's baskets
    "user_item_days_since_log",  # log1p(days since the user last bought it; NEVER_DAYS if not)
    "user_bought_before",  # 1 if the user bought it
    "recently_seen",  # 1 if among the user's recent interactions or the request's recent ids
    "copurchase_sum",  # co-purchase cosine with the recent products, summed
    "copurchase_max",  # and the largest
    "embedding_max",  # embedding cosine with the recent products, the largest
    "embedding_mean",  # with the mean of the recent products' embeddings
    "popularity_recent_log",  # log1p(decayed basket count)
    "popularity_total_log",  # log1p(basket count)
    "repeat_rate",  # share of its buyers who bought it again
    "price_vs_user_log",  # log(price / the user's usual price); 0 when either is unknown
    "user_baskets_log",  # log1p(the user's baskets)
    "user_days_since_last_log",  # log1p(days since the user's last purchase)
)
FEATURE_COUNT = len(FEATURE_NAMES)


@dataclass(frozen=True)
class Seeds:
    """The recent products a user's candidates and features start from, with what both need of
    them, computed once a request."""

    keys: list[int]
    copurchases: list[tuple[np.ndarray, np.ndarray]]  # each seed's (keys, co-purchase scores)
    centre: np.ndarray | None  # the normalised mean of their embeddings; None without seeds


@dataclass(frozen=True)
class Candidates:
    keys: np.ndarray  # int64 [n], store keys, distinct
    features: np.ndarray  # float32 [n, FEATURE_COUNT]


def values_at(keys: np.ndarray, found: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float64 [len(keys)]: the value `found` gives each key (found's keys are distinct), 0
    for a key it does not name. How a seed's co-purchase row lands on candidates."""
    out = np.zeros(len(keys))
    if not len(keys) or not len(found):
        return out
    order = np.argsort(keys, kind="stable")
    positions = np.searchsorted(keys[order], found)
    hit = positions < len(keys)
    hit[hit] = keys[order][positions[hit]] == found[hit]
    out[order[positions[hit]]] = values[hit]
    return out


def _log1p_days(seconds: np.ndarray | float) -> np.ndarray:
    return np.log1p(np.clip(np.asarray(seconds, dtype=np.float64) / DAY_S, 0.0, NEVER_DAYS))


class Recommender:
    """Candidates and features over one Interactions and one LiveCatalog (both kept live by
    their owner, who holds a lock around every call)."""

    def __init__(self, interactions: Interactions, catalog: LiveCatalog) -> None:
        self.interactions = interactions
        self.catalog = catalog
        # Every catalog row, most popular first, and the state it was sorted in: sorting the
        # whole catalog is the costliest step of a request, and only an event or a new row
        # changes the order (deleted rows are skipped when it is read).
        self._popular_order: tuple[tuple, np.ndarray] | None = None

    # --- keys and the catalog -----------------------------------------------------------------

    def rows_of(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Catalog rows of keys; -1 for keys that are not live."""
        row_of = self.catalog.row_of
        return np.array(
            [-1 if (row := row_of(key)) is None else row for key in np.asarray(keys).tolist()],
            dtype=np.int64,
        )

    def _admissible(self, keys: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The keys (in order, distinct) that are live and pass the filter's mask."""
        if not len(keys):
            return keys
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
        rows = self.rows_of(keys)
        keep = rows >= 0
        if allowed is not None:
            keep &= allowed[np.where(keep, rows, 0)]
        return keys[keep]

    def popular(self, count: int, allowed: np.ndarray | None) -> np.ndarray:
        """The `count` most popular live products passing the mask: decayed popularity, then
        basket count; products never bought follow in key order, so a filter that matches k
        products always yields k."""
        order = self._popular_rows()
        passing = self.catalog.alive if allowed is None else allowed
        return self.catalog.keys[order[passing[order]][:count]]

    def _popular_rows(self) -> np.ndarray:
        catalog, interactions = self.catalog, self.interactions
        state = (id(catalog), catalog.count, interactions.events)
        if self._popular_order is None or self._popular_order[0] != state:
            keys = catalog.keys
            known = keys < interactions.size  # keys no event has named have no counts yet
            recent, total = np.zeros(len(keys)), np.zeros(len(keys))
            recent[known] = interactions.popularity()[keys[known]]
            total[known] = interactions.basket_counts[keys[known]]
            self._popular_order = (state, np.lexsort((keys, -total, -recent)))
        return self._popular_order[1]

    # --- recommend ----------------------------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        recent_keys: Sequence[int] = (),
        search_filter: SearchFilter = NO_FILTER,
        top_k: int = 10,
    ) -> Candidates:
        """Candidates for a user (an unknown one gets the popular products) with features."""
        interactions = self.interactions
        history = interactions.user(user_id)
        allowed = self.catalog.allowed(search_filter)
        seeds = self.seeds([*recent_keys, *(history.recent_keys() if history else [])])
        sources = []
        if history is not None and history.items:
            own = np.fromiter(history.items, dtype=np.int64, count=len(history.items))
            counts = np.array([entry[0] for entry in history.items.values()])
            last = np.array([entry[1] for entry in history.items.values()])
            sources.append(own[np.lexsort((-last, -counts))][:OWN_CANDIDATES])
        copurchase = self._copurchase_totals(seeds)
        if copurchase is not None:
            keys, scores = copurchase
            sources.append(keys[np.argsort(-scores, kind="stable")][:COPURCHASE_CANDIDATES])
        if seeds.centre is not None:
            _, rows = self.catalog.search(seeds.centre[None, :], EMBEDDING_CANDIDATES, allowed)
            sources.append(self.catalog.keys_of(rows[0][rows[0] >= 0]))
        sources.append(self.popular(max(POPULAR_CANDIDATES, top_k), allowed))
        keys = self._admissible(np.concatenate(sources).astype(np.int64), allowed)
        keys = keys[:MAX_CANDIDATES]
        return Candidates(keys, self.features(keys, history, seeds, set(recent_keys)))

    def seeds(self, recent: Sequence[int]) -> Seeds:
        """The first SEED_ITEMS distinct live products of `recent` (most recent first)."""
        keys = [key for key in dict.fromkeys(recent) if self.catalog.row_of(key) is not None]
        keys = keys[:SEED_ITEMS]
        return Seeds(
            keys,
            [self.copurchase_scores(key) for key in keys],
            self._centre(keys) if keys else None,
        )

    def _copurchase_totals(self, seeds: Seeds) -> tuple[np.ndarray, np.ndarray] | None:
        parts = [part for part in seeds.copurchases if len(part[0])]
        if not parts:
            return None
        keys = np.concatenate([keys for keys, _ in parts])
        scores = np.concatenate([scores for _, scores in parts])
        keys, inverse = np.unique(keys, return_inverse=True)
        return keys, np.bincount(inverse, weights=scores)

    def copurchase_scores(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """Co-purchase cosine of `key` with the products bought with it, shrunk for pairs seen
        in few baskets."""
        return self.interactions.copurchase_scores(key, shrink=COPURCHASE_SHRINK)

    def _centre(self, keys: Sequence[int]) -> np.ndarray:
        vectors = self.catalog.vectors(self.rows_of(keys))
        centre = vectors.mean(axis=0)
        return (centre / max(float(np.linalg.norm(centre)), 1e-12)).astype(np.float32)

    def features(
        self,
        keys: np.ndarray,
        history: UserHistory | None,
        seeds: Seeds,
        requested: set[int],
    ) -> np.ndarray:
        """float32 [len(keys), FEATURE_COUNT] in FEATURE_NAMES order."""
        n = len(keys)
        interactions, catalog = self.interactions, self.catalog
        now = interactions.clock_s
        features = np.zeros((n, FEATURE_COUNT), dtype=np.float32)
        if not n:
            return features
        rows = self.rows_of(keys)
        columns = {name: position for position, name in enumerate(FEATURE_NAMES)}

        def put(name: str, values) -> None:
            features[:, columns[name]] = values

        recent_set = set(requested) | set(history.recent if history else ())
        put("recently_seen", [key in recent_set for key in keys.tolist()])
        never = NEVER_DAYS * DAY_S
        if history is not None:
            entries = [history.items.get(key) for key in keys.tolist()]
            baskets = np.array([e[0] if e else 0 for e in entries], dtype=np.float64)
            last = np.array([e[1] if e else now - never for e in entries], dtype=np.float64)
            put("user_item_baskets_log", np.log1p(baskets))
            put("user_item_share", baskets / max(history.baskets, 1))
            put("user_item_days_since_log", _log1p_days(now - last))
            put("user_bought_before", baskets > 0)
            put("user_baskets_log", math.log1p(history.baskets))
            since = now - history.last_purchase_s if history.baskets else never
            put("user_days_since_last_log", _log1p_days(since))
        else:
            put("user_item_days_since_log", _log1p_days(never))
            put("user_days_since_last_log", _log1p_days(never))
        if seeds.keys:
            sums, maxima = np.zeros(n), np.zeros(n)
            for found, scores in seeds.copurchases:
                strength = values_at(keys, found, scores)  # >= 0, so 0 for "not bought with"
                sums += strength
                maxima = np.maximum(maxima, strength)
            put("copurchase_sum", sums)
            put("copurchase_max", maxima)
            vectors = catalog.vectors(rows)
            seed_vectors = catalog.vectors(self.rows_of(seeds.keys))
            similarity = vectors @ seed_vectors.T
            put("embedding_max", similarity.max(axis=1))
            put("embedding_mean", vectors @ seeds.centre)
        known = keys < interactions.size

        def per_key(values: np.ndarray) -> np.ndarray:
            # Only known keys index the arrays: before any event they are empty.
            out = np.zeros(n)
            out[known] = values[keys[known]]
            return out

        put("popularity_recent_log", np.log1p(per_key(interactions.popularity())))
        put("popularity_total_log", np.log1p(per_key(interactions.basket_counts)))
        buyers = per_key(interactions.buyers)
        repeaters = per_key(interactions.repeat_buyers)
        put("repeat_rate", repeaters / (buyers + 1.0))
        if history is not None and history.items:
            put("price_vs_user_log", self._price_ratio(rows, history))
        return features

    def _price_ratio(self, rows: np.ndarray, history: UserHistory) -> np.ndarray:
        prices = self.catalog.columns.prices
        own_rows = self.rows_of(list(history.items))
        own_prices = prices[own_rows[own_rows >= 0]]
        own_prices = own_prices[np.isfinite(own_prices) & (own_prices > 0)]
        candidate = prices[rows].astype(np.float64)
        if not len(own_prices):
            return np.zeros(len(rows))
        usual = float(np.exp(np.mean(np.log(own_prices))))
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.log(candidate / usual)
        return np.clip(np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0), -5.0, 5.0)

    # --- similar ------------------------------------------------------------------------------

    def similar(
        self,
        key: int,
        search_filter: SearchFilter = NO_FILTER,
        copurchase_weight: float = DEFAULT_COPURCHASE_WEIGHT,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Products like `key` (live; the caller checks), best first: embedding cosine plus
        `copurchase_weight` times the shrunk co-purchase cosine. (keys, scores)."""
        catalog = self.catalog
        allowed = catalog.allowed(search_filter)
        row = catalog.row_of(key)
        vector = catalog.vectors(np.array([row]))
        _, rows = catalog.search(vector, SIMILAR_POOL + 1, allowed)
        neighbours = catalog.keys_of(rows[0][rows[0] >= 0])
        bought_with, scores = self.copurchase_scores(key)
        if copurchase_weight > 0 and len(bought_with):
            best = np.argsort(-scores, kind="stable")[:SIMILAR_POOL]
            keys = np.concatenate([neighbours, bought_with[best]])
        else:
            keys = neighbours
        keys = self._admissible(keys, allowed)
        keys = keys[keys != key]
        if not len(keys):
            return keys, np.empty(0, dtype=np.float32)
        total = catalog.vectors(self.rows_of(keys)) @ vector[0]
        if copurchase_weight > 0 and len(bought_with):
            total = total + copurchase_weight * values_at(keys, bought_with, scores)
        ranking = np.argsort(-total, kind="stable")
        return keys[ranking], total[ranking].astype(np.float32)
