"""Hybrid candidate generation: the vector top-N and the BM25 top-N, merged and featurised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import FIELDS, LexicalIndex
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
    ranking features of every candidate. `retrieve` takes a whole batch of queries."""

    def __init__(
        self,
        index: CatalogIndex,
        lexical: LexicalIndex,
        vector_pool: int = VECTOR_POOL,
        lexical_pool: int = LEXICAL_POOL,
    ) -> None:
        if lexical.count != index.count:
            raise ValueError(
                f"lexical index has {lexical.count} documents, the vector index {index.count}"
            )
        self.index = index
        self.lexical = lexical
        self.vector_pool = vector_pool
        self.lexical_pool = lexical_pool
        self.width = vector_pool + lexical_pool

    def retrieve(self, queries: Sequence[str], embeddings: np.ndarray) -> CandidateBatch:
        batch = len(queries)
        rows = np.full((batch, self.width), -1, dtype=np.int64)
        features = np.zeros((batch, self.width, FEATURE_COUNT), dtype=np.float32)
        retrieval_scores = np.full((batch, self.width), -np.inf, dtype=np.float32)
        vector_scores, vector_rows = self.index.search(embeddings, self.vector_pool)
        for i, query in enumerate(queries):
            candidates, terms, bm25 = self._query_candidates(
                query, embeddings[i], vector_rows[i], vector_scores[i]
            )
            count = len(candidates.rows)
            rows[i, :count] = candidates.rows
            features[i, :count] = compute_features(
                candidates, terms, bm25, self.lexical, self.vector_pool, self.lexical_pool
            )
            retrieval_scores[i, :count] = features[i, :count, _FUSED]
        return CandidateBatch(rows, features, retrieval_scores)

    def _query_candidates(self, query, embedding, vector_rows, vector_scores):
        terms = self.lexical.terms(query)
        bm25 = {field: self.lexical.scores(terms, field) for field in FIELDS}
        found = vector_rows >= 0
        vector_rows, vector_scores = vector_rows[found], vector_scores[found]
        lexical_rows = top_rows(bm25["text"], self.lexical_pool)
        lexical_only = lexical_rows[~np.isin(lexical_rows, vector_rows)]
        rows = np.concatenate([vector_rows, lexical_only]).astype(np.int64)

        cosine = np.empty(len(rows), dtype=np.float32)
        cosine[: len(vector_rows)] = vector_scores
        if len(lexical_only):
            vectors = self.index.faiss_index.reconstruct_batch(lexical_only)
            cosine[len(vector_rows) :] = vectors @ embedding.astype(np.float32)

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
    (the served encoder) and, when given, have `dimension`; raises IndexLoadError otherwise."""
    if not encoder_onnx.is_file():
        raise FileNotFoundError(
            f"encoder {encoder_onnx} not found; run `ecomsearch export-encoder`"
        )
    index = CatalogIndex.load(
        index_dir, encoder_fingerprint=file_sha256(encoder_onnx), dimension=dimension
    )
    return HybridRetriever(index, index.load_lexical(), vector_pool, lexical_pool)
