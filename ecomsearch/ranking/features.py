"""Numbers describing each (query, candidate) pair: the ranker's input.

One place computes them for serving (the `retrieve` model), training (`train-ranker`) and
benchmarks, so the ranker sees in production exactly what it was trained on. FEATURE_NAMES is
stored in the exported ranker, and the serving side refuses a ranker trained on other features.

Only features every catalog has are used (text and embeddings): a product signal such as price
or popularity that the training catalog lacks would reach the ranker as values it never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch.lexical import LexicalIndex, QueryTerms

FEATURE_NAMES: tuple[str, ...] = (
    "cosine",  # query . product embedding (both unit vectors)
    "cosine_gap",  # cosine minus the best cosine among this query's candidates
    "bm25_text",  # BM25 over title, brand, category and description
    "bm25_text_ratio",  # ... divided by the best among this query's candidates
    "bm25_title",  # BM25 over the title alone
    "bm25_title_ratio",
    "vector_rank",  # log(1 + rank) in the vector list; log(1 + pool) when not in it
    "lexical_rank",  # the same for the BM25 list
    "in_both_lists",
    "title_coverage",  # share of the query's distinct tokens found in the title
    "text_coverage",  # ... found anywhere in the product's text
    "title_idf_coverage",  # share of the query's IDF mass found in the title (rare words count)
    "text_idf_coverage",  # ... anywhere in the text
    "number_coverage",  # share of the query's numbers (sizes, capacities, models) in the text
    "query_has_numbers",
    "query_tokens",  # log(1 + number of distinct query tokens)
    "fused_score",  # cosine + bm25_text_ratio: the retrieval-only ordering
)
FEATURE_COUNT = len(FEATURE_NAMES)
_COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


@dataclass(frozen=True)
class QueryCandidates:
    """One query's candidates before featurisation (rows are FAISS rows, all distinct)."""

    rows: np.ndarray  # [c] int64
    cosine: np.ndarray  # [c] float32
    vector_rank: np.ndarray  # [c] int, pool size when not retrieved by vector
    lexical_rank: np.ndarray  # [c] int, pool size when not retrieved lexically


def _ratio(values: np.ndarray) -> np.ndarray:
    best = float(values.max(initial=0.0))
    return values / best if best > 0 else np.zeros_like(values)


def _coverage(present: np.ndarray) -> np.ndarray:
    """Mean over tokens of presence ([tokens, c] -> [c]); 0 when there are no tokens."""
    return present.mean(axis=0) if len(present) else np.zeros(present.shape[1], np.float32)


def compute_features(
    candidates: QueryCandidates,
    terms: QueryTerms,
    bm25: dict[str, np.ndarray],
    lexical: LexicalIndex,
    vector_pool: int,
    lexical_pool: int,
) -> np.ndarray:
    """[c, FEATURE_COUNT] float32 for one query; `bm25` maps field -> scores of every row."""
    rows = candidates.rows
    features = np.zeros((len(rows), FEATURE_COUNT), dtype=np.float32)
    if not len(rows):
        return features
    cosine = candidates.cosine.astype(np.float32)
    bm25_text = bm25["text"][rows]
    bm25_title = bm25["title"][rows]
    features[:, _COLUMN["cosine"]] = cosine
    features[:, _COLUMN["cosine_gap"]] = cosine - cosine.max()
    features[:, _COLUMN["bm25_text"]] = bm25_text
    features[:, _COLUMN["bm25_text_ratio"]] = _ratio(bm25_text)
    features[:, _COLUMN["bm25_title"]] = bm25_title
    features[:, _COLUMN["bm25_title_ratio"]] = _ratio(bm25_title)
    features[:, _COLUMN["vector_rank"]] = np.log1p(candidates.vector_rank)
    features[:, _COLUMN["lexical_rank"]] = np.log1p(candidates.lexical_rank)
    features[:, _COLUMN["in_both_lists"]] = (candidates.vector_rank < vector_pool) & (
        candidates.lexical_rank < lexical_pool
    )
    for field in ("title", "text"):
        present = lexical.contains(field, terms.tokens, rows)
        features[:, _COLUMN[f"{field}_coverage"]] = _coverage(present)
        weights = lexical.idf(field, terms.tokens)
        if weights.sum() > 0:
            features[:, _COLUMN[f"{field}_idf_coverage"]] = weights @ present / weights.sum()
    features[:, _COLUMN["number_coverage"]] = _coverage(
        lexical.contains("text", terms.numbers, rows)
    )
    features[:, _COLUMN["query_has_numbers"]] = float(bool(terms.numbers))
    features[:, _COLUMN["query_tokens"]] = np.log1p(len(terms.tokens))
    features[:, _COLUMN["fused_score"]] = fused_score(
        cosine, features[:, _COLUMN["bm25_text_ratio"]]
    )
    return features


def fused_score(cosine: np.ndarray, bm25_ratio: np.ndarray) -> np.ndarray:
    """The retrieval stage's own ordering: a score sum of the two normalised signals."""
    return (cosine + bm25_ratio).astype(np.float32)


def check_ranker_features(ranker_info: Path) -> dict[str, Any]:
    """Reads a ranker's `ranker.json`; refuses a ranker trained on other features, or in
    another order, than the ones this code computes."""
    if not ranker_info.is_file():
        raise RuntimeError(f"{ranker_info} not found; train or restore the ranker")
    try:
        info = json.loads(ranker_info.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{ranker_info} is corrupt: {e}") from e
    if not isinstance(info, dict):
        raise RuntimeError(f"{ranker_info} is corrupt: expected a JSON object")
    expected = info.get("feature_names")
    if expected != list(FEATURE_NAMES):
        raise RuntimeError(
            f"the ranker ({ranker_info}) was trained on features {expected}, but this version "
            f"computes {list(FEATURE_NAMES)}; retrain it with `ecomsearch train-ranker`"
        )
    return info
