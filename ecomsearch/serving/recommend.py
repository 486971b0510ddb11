"""The candidate models of `recommend` and `similar`: the live catalog, followed as `retrieve`
follows it, and the event log's statistics, caught up before every batch.

Each instance keeps its own copy of both. The catalog follower runs in the background (see
ecomsearch.live.served); the event log is read in the request thread just before a batch is
computed (an idle poll is an indexed query of microseconds), so an event acknowledged by
`events` shapes the very next recommendation of every instance.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.location import served_store_url
from ecomsearch.live.served import LiveRetriever
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.candidates import HybridRetriever
from ecomsearch.recommend.candidates import FEATURE_COUNT, FEATURE_NAMES, Recommender
from ecomsearch.recommend.interactions import EventCatchUp, Interactions
from ecomsearch.recommend.training import similar_weight
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    model_config,
    text_values,
)
from ecomsearch.serving.retrieve import FILTERS, RetrieveSettings, parse_filters
from ecomsearch.serving.select import parse_top_k
from ecomsearch.store import redact


def check_recommender_features(info_path: Path) -> dict[str, Any]:
    """The trained recommendation ranker's record; raises when it was trained on other
    features than the candidate models compute (it would score nonsense)."""
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path} not found: train the recommendation ranker with "
            "`ecomsearch train-recommender`"
        )
    record = json.loads(info_path.read_text())
    if record.get("feature_names") != list(FEATURE_NAMES):
        raise RuntimeError(
            f"the recommendation ranker ({info_path}) was trained on features "
            f"{record.get('feature_names')}, the candidate models compute {list(FEATURE_NAMES)}; "
            "train it again with `ecomsearch train-recommender`"
        )
    return record


class LiveRecommender:
    """The live catalog and the event statistics one candidate model serves from. Call
    `current` under `lock` before computing a batch."""

    def __init__(
        self,
        retriever: HybridRetriever,
        interactions: Interactions,
        lock: threading.Lock,
        live: LiveRetriever | None = None,
        events: EventCatchUp | None = None,
    ) -> None:
        self.retriever = retriever
        self.interactions = interactions
        self.lock = lock
        self.live = live
        self.events = events
        # One recommender for the model's life: it keeps what it can between batches.
        self.recommender = Recommender(interactions, retriever.catalog)

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils, name: str) -> LiveRecommender:
        import faiss

        # The catalog is followed as retrieve follows it, with the same tunables.
        settings = RetrieveSettings.from_config(model_config(args))
        # One query at a time: FAISS's OpenMP fan-out would only take the encoder's core.
        faiss.omp_set_num_threads(settings.faiss_omp_threads)
        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        check_recommender_features(layout.recommender_info)
        fingerprint = file_sha256(layout.encoder_onnx)
        index_dir = layout.index_dir

        def load_base(directory: Path) -> CatalogIndex:
            return CatalogIndex.load(directory, encoder_fingerprint=fingerprint)

        retriever = HybridRetriever(LiveCatalog.load(load_base(index_dir)))
        lock = threading.Lock()
        interactions = Interactions()
        model = cls(retriever, interactions, lock)
        store_url = served_store_url(layout, retriever.catalog.base.manifest)
        if store_url is None:
            pb_utils.Logger.log_warn(
                f"{name}: the index was built without a catalog store: no event log to "
                "follow; answers are the catalog's, without what shoppers did"
            )
            return model
        model.live = LiveRetriever(
            retriever,
            index_dir,
            store_url,
            lock,
            pb_utils.Logger.log_info,
            load_base,
            warn=pb_utils.Logger.log_warn,
            interval_s=settings.catalog_poll_interval_ms / 1000,
            compact_delta_rows=settings.compact_delta_rows,
            name=name,
        ).catch_up_and_start()
        model.events = EventCatchUp(store_url, interactions)
        applied = model.events.catch_up()
        pb_utils.Logger.log_info(
            f"{name}: {retriever.catalog.live_count} products and {applied} events "
            f"({len(interactions.users)} shoppers) from {redact(store_url)}, instance "
            f"{args['model_instance_name']}"
        )
        return model

    def current(self) -> Recommender:
        """The recommender as of now: the catalog changes and the events read since the last
        call applied. The caller holds `lock`."""
        if self.live is not None:
            self.live.drain()
        if self.events is not None:
            self.events.catch_up()
        # A compaction may have switched the catalog to a new base version.
        self.recommender.catalog = self.retriever.catalog
        return self.recommender

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def _one_per_query(pb_utils, request, name: str, limit_bytes: int) -> np.ndarray:
    raw = input_array(pb_utils, request, name)
    if raw is None:
        raise RequestError(f"input {name!r} is required")
    if raw.ndim != 2 or raw.shape[1] != 1 or not len(raw):
        raise RequestError(f"input {name!r} must have shape [batch, 1], got {list(raw.shape)}")
    return text_values(raw[:, 0], name, limit_bytes)


def _pad(pieces: list[np.ndarray], fill: float, trailing: tuple[int, ...] = ()) -> np.ndarray:
    width = max([len(piece) for piece in pieces] + [1])
    dtype = pieces[0].dtype if pieces else np.float32
    out = np.full((len(pieces), width, *trailing), fill, dtype=dtype)
    for i, piece in enumerate(pieces):
        out[i, : len(piece)] = piece
    return out


TOP_K_ROWS = "top_k_rows"  # each query's k, [batch], between parse and run


class RecommendCandidatesModel(BatchedModel):
    """user_id (+ recent_product_ids, top_k, filters) -> candidate_rows (store keys, -1 pads)
    and candidate_features for the recommendation ranker."""

    def __init__(self, pb_utils, live: LiveRecommender) -> None:
        super().__init__(pb_utils)
        self.live = live

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> RecommendCandidatesModel:
        live = LiveRecommender.from_triton_args(args, pb_utils, "recommend")
        return cls(pb_utils, live).instrumented(args)

    def finalize(self) -> None:
        self.live.stop()

    def parse(self, request) -> Tensors:
        pb_utils = self.pb_utils
        users = _one_per_query(pb_utils, request, contract.USER_ID, contract.MAX_USER_ID_BYTES)
        batch = len(users)
        recent = input_array(pb_utils, request, contract.RECENT_PRODUCT_IDS)
        if recent is None:
            recent = np.empty((batch, 0), dtype=object)
        elif recent.ndim != 2 or len(recent) != batch:
            raise RequestError(
                f"input {contract.RECENT_PRODUCT_IDS!r} must have shape [{batch}, r], got "
                f"{list(recent.shape)}"
            )
        elif recent.shape[1] > contract.MAX_RECENT_PRODUCTS:
            raise RequestError(
                f"at most {contract.MAX_RECENT_PRODUCTS} recent products a query, got "
                f"{recent.shape[1]}"
            )
        else:
            recent = text_values(recent, contract.RECENT_PRODUCT_IDS, contract.MAX_PRODUCT_ID_BYTES)
        top_k = parse_top_k(input_array(pb_utils, request, contract.TOP_K), batch)
        return {
            contract.USER_ID: users,
            contract.RECENT_PRODUCT_IDS: recent,
            TOP_K_ROWS: np.full(batch, top_k, dtype=np.int32),
            FILTERS: parse_filters(pb_utils, request, batch),
        }

    def run(self, inputs: Tensors) -> Tensors:
        keys, features = [], []
        with self.live.lock:
            recommender = self.live.current()
            key_of_id = recommender.catalog.key_of_id
            for user_id, recent, top_k, search_filter in zip(
                inputs[contract.USER_ID],
                inputs[contract.RECENT_PRODUCT_IDS],
                inputs[TOP_K_ROWS].tolist(),
                inputs[FILTERS],
                strict=True,
            ):
                # Recent products no longer in the catalog are left out, not refused: a
                # shopper's session may outlive a product.
                recent_keys = [k for pid in recent if pid and (k := key_of_id(pid)) is not None]
                candidates = recommender.recommend(user_id, recent_keys, search_filter, top_k)
                keys.append(candidates.keys)
                features.append(candidates.features)
        return {
            contract.CANDIDATE_ROWS: _pad(keys, -1),
            contract.CANDIDATE_FEATURES: _pad(features, 0.0, (FEATURE_COUNT,)),
        }


class SimilarCandidatesModel(BatchedModel):
    """product_id (+ top_k, filters) -> candidate_rows and candidate_scores for `select`:
    embedding neighbours blended with co-purchases (the weight train-recommender chose)."""

    def __init__(self, pb_utils, live: LiveRecommender, copurchase_weight: float) -> None:
        super().__init__(pb_utils)
        self.live = live
        self.copurchase_weight = copurchase_weight

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> SimilarCandidatesModel:
        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        weight = similar_weight(layout.recommender_info)
        pb_utils.Logger.log_info(f"similar: co-purchase weight {weight:g}")
        live = LiveRecommender.from_triton_args(args, pb_utils, "similar")
        return cls(pb_utils, live, weight).instrumented(args)

    def finalize(self) -> None:
        self.live.stop()

    def parse(self, request) -> Tensors:
        pb_utils = self.pb_utils
        products = _one_per_query(
            pb_utils, request, contract.PRODUCT_ID, contract.MAX_PRODUCT_ID_BYTES
        )
        batch = len(products)
        top_k = parse_top_k(input_array(pb_utils, request, contract.TOP_K), batch)
        return {
            contract.PRODUCT_ID: products,
            TOP_K_ROWS: np.full(batch, top_k, dtype=np.int32),
            FILTERS: parse_filters(pb_utils, request, batch),
        }

    def run(self, inputs: Tensors) -> Tensors:
        keys, scores = [], []
        with self.live.lock:
            recommender = self.live.current()
            for product_id, search_filter in zip(
                inputs[contract.PRODUCT_ID], inputs[FILTERS], strict=True
            ):
                key = recommender.catalog.key_of_id(product_id)
                if key is None:
                    raise RequestError(f"no live product {product_id!r} in the catalog")
                found, blended = recommender.similar(key, search_filter, self.copurchase_weight)
                keys.append(found)
                scores.append(blended.astype(np.float32))
        return {
            contract.CANDIDATE_ROWS: _pad(keys, -1),
            contract.CANDIDATE_SCORES: _pad(scores, -np.inf),
        }
