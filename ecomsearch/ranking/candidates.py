"""Hybrid candidate generation: the vector top-N and the BM25 top-N, merged and featurised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch.encoder import OnnxEncoder
from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import FIELDS
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.filters import NO_FILTER, SearchFilter
from ecomsearch.ranking.features import (
    FEATURE_COUNT,
    FEATURE_NAMES,
    QueryCandidates,
    compute_features,
)

# Candidates per source. Recall@100 after ranking is bounded by the union's recall, and the
# ranker's cost is tiny, so the pools are generous; the union has at most their sum.
VECTOR_POOL = 200
LEXICAL_POOL = 200
_FUSED = FEATURE_NAMES.index("fused_score")


@dataclass(frozen=True)
class CandidateBatch:
    """Candidates of a batch of queries, padded to a fixed width so batches always stack."""

    rows: np.ndarray  # [batch, width] int64, -1 marks padding
    features: np.ndarray  # [batch, width, FEATURE_COUNT] float32, zeros for padding
    retrieval_scores: np.ndarray  # [batch, width] float32, -inf for padding


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best positive scores, best first (ties by row, for determinism)."""
    positive = np.flatnonzero(scores > 0)  # ascending rows
    if len(positive) > k:
        values = scores[positive]
        kth = np.partition(values, len(values) - k)[len(values) - k]  # the k-th best score
        above = positive[values > kth]
        tied = positive[values == kth]  # still ascending: the lowest rows win the tie
        positive = np.concatenate([above, tied[: k - len(above)]])
    return positive[np.lexsort((positive, -scores[positive]))]


class HybridRetriever:
    """The retrieval stage: the vector top-N and the BM25 top-N of each query, merged, with the
    ranking features of every candidate. `retrieve` takes a whole batch of queries, each with
    its own filters, over a LiveCatalog (a built index plus the live changes since).

    Candidates are restricted to the rows a query's filters allow before either search, so the
    lists are as long as they would be unfiltered whenever enough products pass."""

    def __init__(
        self,
        catalog: LiveCatalog,
        vector_pool: int = VECTOR_POOL,
        lexical_pool: int = LEXICAL_POOL,
    ) -> None:
        self.catalog = catalog  # replaced whole when a compacted index is switched in
        self.vector_pool = vector_pool
        self.lexical_pool = lexical_pool
        self.width = vector_pool + lexical_pool

    def retrieve(
        self,
        queries: Sequence[str],
        embeddings: np.ndarray,
        filters: Sequence[SearchFilter] | None = None,
    ) -> CandidateBatch:
        """Candidates of each query; their `rows` are the products' store keys."""
        catalog = self.catalog
        batch = len(queries)
        filters = [NO_FILTER] * batch if filters is None else filters
        rows = np.full((batch, self.width), -1, dtype=np.int64)
        features = np.zeros((batch, self.width, FEATURE_COUNT), dtype=np.float32)
        retrieval_scores = np.full((batch, self.width), -np.inf, dtype=np.float32)
        groups: dict[SearchFilter, list[int]] = {}
        for i, search_filter in enumerate(filters):
            groups.setdefault(search_filter, []).append(i)
        for search_filter, members in groups.items():
            allowed = catalog.allowed(search_filter)
            vector_scores, vector_rows = catalog.search(
                embeddings[members], self.vector_pool, allowed
            )
            for j, i in enumerate(members):
                candidates, terms, bm25 = self._query_candidates(
                    catalog, queries[i], embeddings[i], vector_rows[j], vector_scores[j], allowed
                )
                count = len(candidates.rows)
                rows[i, :count] = candidates.rows
                features[i, :count] = compute_features(
                    candidates, terms, bm25, catalog.lexical, self.vector_pool, self.lexical_pool
                )
                retrieval_scores[i, :count] = features[i, :count, _FUSED]
        return CandidateBatch(catalog.keys_of(rows), features, retrieval_scores)

    def _query_candidates(self, catalog, query, embedding, vector_rows, vector_scores, allowed):
        lexical = catalog.lexical
        terms = lexical.terms(query)
        bm25 = {field: lexical.scores(terms, field) for field in FIELDS}
        found = vector_rows >= 0
        vector_rows, vector_scores = vector_rows[found], vector_scores[found]
        text_scores = bm25["text"] if allowed is None else np.where(allowed, bm25["text"], 0)
        lexical_rows = top_rows(text_scores, self.lexical_pool)
        lexical_only = lexical_rows[~np.isin(lexical_rows, vector_rows)]
        rows = np.concatenate([vector_rows, lexical_only]).astype(np.int64)

        cosine = np.empty(len(rows), dtype=np.float32)
        cosine[: len(vector_rows)] = vector_scores
        if len(lexical_only):
            cosine[len(vector_rows) :] = catalog.vectors(lexical_only) @ embedding.astype(
                np.float32
            )

        vector_rank = np.full(len(rows), self.vector_pool, dtype=np.int64)
        vector_rank[: len(vector_rows)] = np.arange(len(vector_rows))
        # Each candidate's position in the BM25 list (pool size when absent), by binary search.
        lexical_rank = np.full(len(rows), self.lexical_pool, dtype=np.int64)
        if len(lexical_rows):
            by_row = np.argsort(lexical_rows)
            slots = np.minimum(np.searchsorted(lexical_rows[by_row], rows), len(by_row) - 1)
            found = lexical_rows[by_row[slots]] == rows
            lexical_rank[found] = by_row[slots[found]]
        return QueryCandidates(rows, cosine, vector_rank, lexical_rank), terms, bm25


def open_retriever(
    index_dir: Path,
    encoder_onnx: Path,
    vector_pool: int = VECTOR_POOL,
    lexical_pool: int = LEXICAL_POOL,
    dimension: int | None = None,
) -> HybridRetriever:
    """The retrieval stage over a built index, which must have been embedded by `encoder_onnx`
    (the served encoder) and, when given, have `dimension`; raises IndexLoadError otherwise.
    The catalog is as built: the caller applies live changes (ecomsearch.live.follower)."""
    if not encoder_onnx.is_file():
        raise FileNotFoundError(
            f"encoder {encoder_onnx} not found; run `ecomsearch export-encoder`"
        )
    index = CatalogIndex.load(
        index_dir, encoder_fingerprint=file_sha256(encoder_onnx), dimension=dimension
    )
    return HybridRetriever(LiveCatalog.load(index), vector_pool, lexical_pool)


@dataclass(frozen=True)
class CatalogRetrieval:
    """The served retrieval stage over a catalog, in-process, for training: the candidates and
    the encoder of a model repository built for it (ecomsearch.workspace)."""

    index: CatalogIndex
    retriever: HybridRetriever
    encoder: OnnxEncoder  # the served query encoder
    ids: dict[int, bytes]  # store key -> product id: candidates come back as keys


def catalog_retrieval(catalog: Path, cache_dir: Path, source: Path) -> CatalogRetrieval:
    """Builds (or reuses, under cache_dir) the index of `catalog` with the encoder of the model
    repository `source`, and opens its retrieval stage and query encoder."""
    from ecomsearch import contract
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(catalog, cache_dir, source=source)
    workspace = ModelRepositoryLayout(repository)
    index = CatalogIndex.load(workspace.index_dir)
    encoder = OnnxEncoder(
        workspace.encoder_onnx, workspace.tokenizer_dir, max_length=contract.MAX_QUERY_TOKENS
    )
    return CatalogRetrieval(
        index,
        HybridRetriever(LiveCatalog.load(index)),
        encoder,
        dict(zip(index.keys.tolist(), index.ids, strict=True)),
    )
