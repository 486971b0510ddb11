"""The cross-encoder rerank stage: how its verdict on the ranker's best candidates becomes their
scores.

A cascade: the ranker orders every candidate; the cross-encoder (ecomsearch.tuning.cross_encoder)
reads the query with each of the best `depth` candidates' titles, and those candidates are
reordered by the ranker's score plus RERANK_WEIGHT times the cross-encoder's logit. They stay
above every candidate it did not read (whose logit is unknown, not low): when the blend would
drop one below the best of the rest, the whole reranked block is lifted by the same amount.
The term each hit gets is returned, so explanations can show it and still sum to the score.
"""

from __future__ import annotations

import numpy as np

# The cross-encoder logit's weight against the ranker's score, chosen on the training split
# (docs/relevance.md): the ranker's score stays in the blend as its tie-breaker and prior.
RERANK_WEIGHT = 1.0
# How far the reranked block stays above the best candidate outside it.
BLOCK_MARGIN = 1e-3


def depth_mask(top_rows: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """[batch, max depth] bool: the columns of each query's best candidates that it asked to
    rerank (its own depth, real rows only)."""
    columns = np.arange(top_rows.shape[1])[None, :]
    return (columns < depths[:, None]) & (top_rows >= 0)


def rerank_terms(
    scores: np.ndarray,
    logits: np.ndarray,
    reranked: np.ndarray,
    best_of_rest: np.ndarray,
    weight: float = RERANK_WEIGHT,
) -> np.ndarray:
    """What to add to each reranked candidate's score ([batch, depth] float32, 0 where not
    reranked).

    `scores`, `logits` and `reranked` are [batch, depth]: the ranker's (and personalisation's)
    scores of each query's best candidates, the cross-encoder's logits for them, and which of
    them are reranked. `best_of_rest` [batch] is the best score outside the reranked block
    (-inf when there is none)."""
    blended = scores + np.float32(weight) * logits
    lowest = np.where(reranked, blended, np.inf).min(axis=1)
    gap = best_of_rest + BLOCK_MARGIN - lowest
    lift = np.where(np.isfinite(gap) & (gap > 0), gap, 0.0)
    terms = np.float32(weight) * logits + lift[:, None]
    return np.where(reranked, terms, 0.0).astype(np.float32)
