"""Top-k selection over scored candidates: the `select` stage's computation, and the one that
training and the in-process pipeline call to order candidates "as the served model would"."""

from __future__ import annotations

import numpy as np


def best_positions(scores: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """[n, min(k, width)] candidate positions per query, best score first; invalid candidates
    (padding) never precede valid ones, and ties go to the earlier position, so a query's answer
    does not depend on the k of the queries batched with it."""
    masked = np.where(valid, scores, -np.inf).astype(np.float32, copy=False)
    # A full stable sort of a few hundred scores costs microseconds and is deterministic.
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def top_k(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per query, the positions of the k best-scoring candidates (-1 padding never wins), their
    rows and their scores (-inf for padding), best first."""
    best = best_positions(scores, rows >= 0, k)
    chosen_scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32, copy=False)
    return (
        best,
        np.take_along_axis(rows, best, axis=1),
        np.take_along_axis(chosen_scores, best, axis=1),
    )


def top_k_rows(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best-scoring candidate rows and their scores: top_k without positions."""
    _, best_rows, best_scores = top_k(rows, scores, k)
    return best_rows, best_scores
