"""The `select` model: the top-k candidates by a score, as product ids, scores and titles.

Fed the ranker's scores in `search`, and the retrieval stage's own scores in `search_unranked`.
A query that carries a user id (personalised `search`) has each score raised by the shopper's
affinity for the product (ecomsearch.recommend.personal), read from the event log, which this
model then follows as the recommenders do. With a rerank depth (a request's `rerank_depth`,
else the model's `rerank_depth` parameter, 0 as shipped), the best candidates so far are
rescored with the cross-encoder (ecomsearch.ranking.rerank) before the top k are taken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.index.manifest import IndexManifest
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.follower import DEFAULT_POLL_INTERVAL_S, ChangeFollower
from ecomsearch.live.labels import ProductLabels
from ecomsearch.live.location import served_store_url
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.explain import (
    Explainer,
    ExplainerError,
    explanations_json,
    load_explainer,
)
from ecomsearch.ranking.features import FEATURE_COUNT
from ecomsearch.ranking.rerank import depth_mask, rerank_terms
from ecomsearch.ranking.selection import top_k
from ecomsearch.recommend.interactions import EventCatchUp, Interactions
from ecomsearch.recommend.personal import PERSONAL_WEIGHT, affinity
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
    text_values,
)
from ecomsearch.serving.metrics import APPLIED_SEQ, CAUGHT_UP, EMPTY_RESULTS, MetricSpec
from ecomsearch.serving.rerank import CrossEncoderScorer, RerankUnavailableError
from ecomsearch.store import redact

# (queries, titles) -> the cross-encoder's logit for each pair.
RelevanceScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def parse_top_k(raw: np.ndarray | None, batch: int) -> int:
    """The request's k: absent means the default; one value for every query of the request."""
    if raw is None:
        return contract.DEFAULT_TOP_K
    if raw.shape != (batch, 1):
        raise RequestError(
            f"input {contract.TOP_K!r} must have shape [{batch}, 1], got {raw.shape}"
        )
    values = np.unique(raw)
    if len(values) != 1:
        raise RequestError(f"{contract.TOP_K!r} must be the same for every query of a request")
    top_k = int(values[0])
    if not 1 <= top_k <= contract.MAX_TOP_K:
        raise RequestError(
            f"{contract.TOP_K!r} must be between 1 and {contract.MAX_TOP_K}, got {top_k}"
        )
    return top_k


def parse_explain(raw: np.ndarray | None, batch: int) -> np.ndarray:
    """The optional `explain` flag of each query (all false when absent)."""
    if raw is None:
        return np.zeros(batch, dtype=bool)
    if raw.shape != (batch, 1) or raw.dtype != np.bool_:
        raise RequestError(
            f"input {contract.EXPLAIN!r} must be BOOL [{batch}, 1], got {raw.dtype} {raw.shape}"
        )
    return raw[:, 0].copy()


def explainer_of(layout: ModelRepositoryLayout, pb_utils) -> dict[str, Any]:
    """The served ranker's explainer, or why there is none (logged: the model still loads)."""
    try:
        return {"explainer": load_explainer(layout.ranker_tree_model, layout.ranker_mlp_weights)}
    except ExplainerError as e:
        pb_utils.Logger.log_warn(f"select: searches cannot be explained: {e}")
        return {"no_explainer_reason": str(e)}


def parse_rerank_depths(raw: np.ndarray | None, batch: int, default: int) -> np.ndarray:
    """Each query's rerank depth (int32 [batch]): the request's, else the model's default."""
    if raw is None:
        return np.full(batch, default, dtype=np.int32)
    if raw.shape != (batch, 1) or raw.dtype != np.int32:
        raise RequestError(
            f"input {contract.RERANK_DEPTH!r} must be INT32 [{batch}, 1], "
            f"got {raw.dtype} {raw.shape}"
        )
    depths = raw[:, 0]
    if depths.min() < 0 or depths.max() > contract.MAX_RERANK_DEPTH:
        raise RequestError(
            f"{contract.RERANK_DEPTH!r} must be between 0 and {contract.MAX_RERANK_DEPTH}"
        )
    return depths.astype(np.int32)


def reranker_of(layout: ModelRepositoryLayout, depth: int, pb_utils) -> dict[str, Any]:
    """The cross-encoder's scorer and the default depth, or no rerank when the served
    tokenizer is missing (logged: searches go on unreranked)."""
    try:
        scorer = CrossEncoderScorer(pb_utils, layout.tokenizer_dir)
    except FileNotFoundError as e:
        pb_utils.Logger.log_warn(f"select: searches cannot be reranked: {e}")
        return {"relevance": None, "rerank_depth": 0}
    return {"relevance": scorer, "rerank_depth": depth}


def parse_user_ids(raw: np.ndarray, batch: int) -> np.ndarray:
    """The optional `user_id` of a personalised search: one per query ("" for none)."""
    if raw.shape != (batch, 1):
        raise RequestError(
            f"input {contract.USER_ID!r} must have shape [{batch}, 1], got {raw.shape}"
        )
    return text_values(raw[:, 0], contract.USER_ID, contract.MAX_USER_ID_BYTES)


class SelectModel(BatchedModel):
    def __init__(
        self,
        pb_utils,
        labels: ProductLabels,
        lock: threading.Lock | None = None,
        explainer: Explainer | None = None,
        no_explainer_reason: str = "this server's ranker cannot be explained",
        relevance: RelevanceScorer | None = None,
        rerank_depth: int = 0,
    ) -> None:
        if not 0 <= rerank_depth <= contract.MAX_RERANK_DEPTH:
            raise ValueError(
                f"parameter 'rerank_depth' must be from 0 to {contract.MAX_RERANK_DEPTH}, "
                f"got {rerank_depth}"
            )
        super().__init__(pb_utils)
        self.labels = labels
        # The served ranker's explainer (ecomsearch.ranking.explain), read at load; without
        # one, `explain` is a bad request and searches go on.
        self.explainer = explainer
        self.no_explainer_reason = no_explainer_reason
        # The cross-encoder rerank: its scorer, and the depth a request gets by default.
        self.relevance = relevance
        self.rerank_depth = rerank_depth
        self.lock = lock or threading.Lock()
        self.follower: ChangeFollower | None = None
        self._catch_up_store: Any = None  # the request thread's own store connection
        # What shoppers did, for personalised searches: read from the event log on the first
        # one (a plain search never pays for it), then caught up before each.
        self.events: EventCatchUp | None = None

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> SelectModel:
        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        config = model_config(args)
        interval_ms = int_parameter(
            config, "catalog_poll_interval_ms", round(1000 * DEFAULT_POLL_INTERVAL_S), 1
        )
        rerank = reranker_of(layout, int_parameter(config, "rerank_depth", 0), pb_utils)
        # The index `retrieve` serves: the latest version's, as the ensembles ask for.
        manifest = IndexManifest.read(layout.index_dir)
        store_url = served_store_url(layout, manifest)
        if store_url is None:
            index = CatalogIndex.load(layout.index_dir, load_vectors=False)
            model = cls(
                pb_utils,
                ProductLabels.from_index(index.keys, index.metadata),
                **explainer_of(layout, pb_utils),
                **rerank,
            ).instrumented(args)
            pb_utils.Logger.log_info(f"select: {index.count} products from {layout.index_dir}")
            return model
        from ecomsearch.store import open_store

        labels = ProductLabels()
        with open_store(store_url) as store:
            seq, products = store.snapshot(with_embeddings=False)
        labels.load(seq, products)
        model = cls(pb_utils, labels, **explainer_of(layout, pb_utils), **rerank).instrumented(args)
        model.events = EventCatchUp(store_url, Interactions())
        model.follower = ChangeFollower(
            store_url,
            labels.apply,
            seq,
            model.lock,
            interval_ms / 1000,
            pb_utils.Logger.log_warn,
            name="select-follower",
            with_embeddings=False,
        ).start()
        model.metrics.watch(model.catalog_state)
        pb_utils.Logger.log_info(
            f"select: {labels.live_count} products at change {seq} from {redact(store_url)}"
        )
        return model

    def counters(self) -> list[tuple[MetricSpec, dict[str, str]]]:
        return [*super().counters(), (EMPTY_RESULTS, {})]

    def catalog_state(self) -> dict[MetricSpec, float | None]:
        """The labels' catalog gauges (each value one attribute: read without the lock)."""
        return {
            APPLIED_SEQ: self.labels.applied_seq,
            CAUGHT_UP: None if self.follower is None else self.follower.caught_up_at,
        }

    def finalize(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self._catch_up_store is not None:
            self._catch_up_store.close()
        self.metrics.close()

    def follower_drain(self) -> None:
        """Applies the changes the follower has read; the caller holds the lock."""
        if self.follower is not None:
            self.follower.drain()

    def _catch_up(self) -> None:
        """Applies every committed change now: a candidate named a product this instance has
        not heard of yet (a `retrieve` instance polled the store first)."""
        if self.follower is None:
            return
        if self._catch_up_store is None:
            from ecomsearch.store import open_store

            self._catch_up_store = open_store(self.follower.store_url)
        self.follower.catch_up(self._catch_up_store)

    def parse(self, request) -> Tensors:
        rows = input_array(self.pb_utils, request, contract.CANDIDATE_ROWS)
        scores = input_array(self.pb_utils, request, contract.CANDIDATE_SCORES)
        if rows is None or scores is None:
            raise RequestError(
                f"{contract.CANDIDATE_ROWS!r} and {contract.CANDIDATE_SCORES!r} are required"
            )
        if rows.ndim != 2 or rows.shape != scores.shape or rows.shape[1] == 0:
            raise RequestError(
                f"candidate rows {rows.shape} and scores {scores.shape} must be equal [batch, n]"
            )
        if rows.shape[1] > contract.MAX_CANDIDATES:
            raise RequestError(
                f"{rows.shape[1]} candidates a query; the maximum is {contract.MAX_CANDIDATES}"
            )
        # -1 pads a query with fewer candidates; any other value must be a product's key.
        rows = rows.astype(np.int64, copy=False)
        if not self.labels.known(rows).all():
            self._catch_up()
            with self.lock:
                self.follower_drain()
                unknown = ~self.labels.known(rows)
            if unknown.any():
                raise RequestError(
                    f"candidate rows must be -1 (padding) or product keys of the catalog; "
                    f"{int(rows[unknown][0])} is neither"
                )
        if not np.isfinite(scores[rows >= 0]).all():
            raise RequestError("candidate scores must be finite (NaN or infinity found)")
        top_k = parse_top_k(input_array(self.pb_utils, request, contract.TOP_K), len(rows))
        inputs = {
            contract.CANDIDATE_ROWS: rows,
            contract.CANDIDATE_SCORES: scores,
            contract.TOP_K: np.full(len(rows), top_k, dtype=np.int32),
        }
        users = input_array(self.pb_utils, request, contract.USER_ID)
        if users is not None:
            inputs[contract.USER_ID] = parse_user_ids(users, len(rows))
        # A request without the query text (search_unranked) is not reranked by default.
        queries = input_array(self.pb_utils, request, contract.QUERY)
        raw_depths = input_array(self.pb_utils, request, contract.RERANK_DEPTH)
        depths = parse_rerank_depths(
            raw_depths, len(rows), 0 if queries is None else self.rerank_depth
        )
        if depths.any():
            if queries is None or queries.shape != (len(rows), 1):
                raise RequestError(
                    f"a rerank needs the {contract.QUERY!r} of each query ([{len(rows)}, 1]; the "
                    "`search` ensemble sends it)"
                )
            if self.relevance is None:
                raise RequestError("this server has no cross-encoder to rerank with")
            inputs[contract.QUERY] = text_values(
                queries[:, 0], contract.QUERY, contract.MAX_QUERY_BYTES
            )
            inputs[contract.RERANK_DEPTH] = depths
        features = input_array(self.pb_utils, request, contract.CANDIDATE_FEATURES)
        explain = parse_explain(input_array(self.pb_utils, request, contract.EXPLAIN), len(rows))
        if explain.any():
            if self.explainer is None:
                raise RequestError(f"explanations are unavailable: {self.no_explainer_reason}")
            if features is None:
                raise RequestError(
                    f"{contract.EXPLAIN!r} needs the candidates' features (the `search` "
                    "ensemble sends them; `search_unranked` has no ranker to explain)"
                )
            if features.shape != (*rows.shape, FEATURE_COUNT):
                raise RequestError(
                    f"{contract.CANDIDATE_FEATURES!r} must be [batch, candidates, "
                    f"{FEATURE_COUNT}] like the rows {rows.shape}, got {features.shape}"
                )
            inputs[contract.CANDIDATE_FEATURES] = features.astype(np.float32, copy=False)
            inputs[contract.EXPLAIN] = explain
        return inputs

    def personalised(self, users: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The scores with each known shopper's affinity added (the caller holds the lock)."""
        self.events.catch_up()
        scores = scores.astype(np.float32, copy=True)
        for row, user_id in enumerate(users):
            valid = rows[row] >= 0
            if not user_id or not valid.any():
                continue
            boost = affinity(self.events.interactions, user_id, rows[row][valid])
            if boost is not None:
                scores[row, valid] += np.float32(PERSONAL_WEIGHT) * boost.astype(np.float32)
        return scores

    def group_key(self, inputs: Tensors) -> Hashable:
        # Requests asking for different k run apart, so each run returns exactly its k columns.
        return super().group_key(inputs), int(inputs[contract.TOP_K][0])

    def run(self, inputs: Tensors) -> Tensors:
        k = int(inputs[contract.TOP_K][0])
        rows, scores = inputs[contract.CANDIDATE_ROWS], inputs[contract.CANDIDATE_SCORES]
        ranker_scores = scores
        with self.lock:
            self.follower_drain()
            users = inputs.get(contract.USER_ID)
            if users is not None and self.events is not None and any(users):
                scores = self.personalised(users, rows, scores)
            # A product deleted since `retrieve` found it is dropped here, where the freshest
            # state is read: the window in which a deleted product can show is the shorter.
            live = self.labels.live(rows)
            if not live.all():
                rows = np.where(live, rows, -1)
            personalised = scores
            depths = inputs.get(contract.RERANK_DEPTH)
            rerank_terms_of = None  # [batch, candidates]: what the rerank added
            if depths is not None:
                rerank_terms_of = self.rerank(inputs[contract.QUERY], depths, rows, scores)
                if rerank_terms_of is not None:
                    scores = scores + rerank_terms_of
            positions, top_rows, top_scores = top_k(rows, scores, k)
            labels = self.labels.labels(top_rows)
        self.metrics.count(EMPTY_RESULTS, int((~(top_rows >= 0).any(axis=1)).sum()))
        # Fewer candidates than k (a tiny catalog): empty ids that clients skip.
        outputs = {
            contract.PRODUCT_IDS: labels["ids"],
            contract.SCORES: top_scores,
            contract.TITLES: labels["titles"],
            contract.PRICES: labels["prices"],
            contract.IN_STOCK: labels["in_stock"],
        }
        explanations = np.full(top_rows.shape, b"", dtype=object)
        explain = inputs.get(contract.EXPLAIN)
        if explain is not None and explain.any():
            self._explain(
                inputs,
                explain,
                positions,
                top_rows,
                top_scores,
                ranker_scores,
                personalised,
                rerank_terms_of,
                explanations,
            )
        outputs[contract.EXPLANATIONS] = explanations
        return outputs

    def _explain(
        self,
        inputs: Tensors,
        explain: np.ndarray,
        positions: np.ndarray,
        top_rows: np.ndarray,
        top_scores: np.ndarray,
        ranker_scores: np.ndarray,
        personalised: np.ndarray,
        reranks: np.ndarray | None,
        out: np.ndarray,
    ) -> None:
        """Fills `out` (object [batch, k]) for the queries that asked, all in one call of the
        explainer; the personalisation and rerank terms are what select added to the ranker's
        score."""
        features = inputs[contract.CANDIDATE_FEATURES]
        wanted = explain[:, None] & (top_rows >= 0)
        query, column = np.nonzero(wanted)
        if not len(query):
            return
        position = positions[query, column]
        chosen = features[query, position]
        contributions = self.explainer.contributions(chosen)
        served = top_scores[query, column]
        rerank = np.zeros(len(query), np.float32) if reranks is None else reranks[query, position]
        personal = personalised[query, position] - ranker_scores[query, position]
        for (q, c), text in zip(
            zip(query, column, strict=True),
            explanations_json(chosen, contributions, served, personal, rerank),
            strict=True,
        ):
            out[q, c] = text

    def rerank(
        self, queries: np.ndarray, depths: np.ndarray, rows: np.ndarray, scores: np.ndarray
    ) -> np.ndarray | None:
        """The cross-encoder's terms for each query's best `depth` candidates, to add to
        `scores` (float32 like them; ecomsearch.ranking.rerank), or None when there is nothing
        to rerank. The caller holds the lock, so the titles read are the ones served. Without an
        answer from the cross-encoder the search is served as ranked, and that is logged."""
        max_depth = int(depths.max())
        # One column more than the deepest rerank: the best score of the rest.
        positions, top_rows, top_scores = top_k(rows, scores, max_depth + 1)
        reranked = depth_mask(top_rows[:, :max_depth], depths)
        if not reranked.any():
            return None
        query_of, column = np.nonzero(reranked)
        titles = self.labels.labels(top_rows[query_of, column])["titles"]
        try:
            logits = self.relevance(
                [queries[q] for q in query_of], [t.decode("utf-8") for t in titles]
            )
        except RerankUnavailableError as e:
            self.pb_utils.Logger.log_warn(f"select: served without the rerank: {e}")
            return None
        block_logits = np.zeros(reranked.shape, np.float32)
        block_logits[query_of, column] = logits
        # The best score outside each query's reranked block (-inf when it has no candidate).
        outside = np.arange(top_scores.shape[1])[None, :] >= depths[:, None]
        best_of_rest = np.where(outside, top_scores, -np.inf).max(axis=1)
        terms = rerank_terms(top_scores[:, :max_depth], block_logits, reranked, best_of_rest)
        all_terms = np.zeros(scores.shape, np.float32)
        np.put_along_axis(all_terms, positions[:, :max_depth], terms, axis=1)
        return all_terms
