"""Top-k selection (ecomsearch.ranking.selection): what `select` serves, and the order that
training and the in-process pipeline reproduce."""

from __future__ import annotations

import numpy as np

from ecomsearch.ranking.selection import best_positions, top_k_rows


def test_top_k_rows_orders_best_first_and_skips_padding() -> None:
    rows = np.array([[10, 11, -1, 13], [20, -1, -1, 23]], np.int64)
    scores = np.array([[0.5, 2.0, 9.0, 1.0], [-1.0, 5.0, 6.0, -2.0]], np.float32)

    top_rows, top_scores = top_k_rows(rows, scores, 3)

    assert top_rows.tolist() == [[11, 13, 10], [20, 23, -1]]
    np.testing.assert_array_equal(top_scores, [[2.0, 1.0, 0.5], [-1.0, -2.0, -np.inf]])
    assert top_scores.dtype == np.float32


def test_top_k_rows_with_k_above_the_width_returns_every_candidate() -> None:
    rows = np.array([[5, 6, 7]], np.int64)
    top_rows, top_scores = top_k_rows(rows, np.array([[1, 3, 2]], np.float32), 10)
    assert top_rows.tolist() == [[6, 7, 5]]
    assert top_scores.tolist() == [[3, 2, 1]]


def test_top_k_rows_keeps_candidate_order_among_ties_when_all_fit() -> None:
    rows = np.array([[40, 41, 42, 43, 44]], np.int64)
    scores = np.array([[1, 2, 1, 2, 1]], np.float32)
    top_rows, _ = top_k_rows(rows, scores, 5)
    assert top_rows.tolist() == [[41, 43, 40, 42, 44]]


def test_top_k_rows_breaks_ties_by_candidate_order_for_every_k() -> None:
    width = 20
    rows = np.arange(100, 100 + width, dtype=np.int64)[None]
    scores = np.ones((1, width), np.float32)
    scores[0, 0] = 2.0
    for k in range(1, width + 1):
        top_rows, _ = top_k_rows(rows, scores, k)
        assert top_rows.tolist() == [rows[0, :k].tolist()], k


def test_best_positions_put_invalid_candidates_last_even_with_higher_scores() -> None:
    scores = np.array([[5.0, 1.0, 9.0, 3.0]], np.float32)
    valid = np.array([[True, True, False, True]])
    assert best_positions(scores, valid, 4).tolist() == [[0, 3, 1, 2]]
    assert best_positions(scores, valid, 2).tolist() == [[0, 3]]


def test_best_positions_agree_with_top_k_rows() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(-1, 50, size=(6, 30))
    scores = rng.normal(size=(6, 30)).astype(np.float32)
    positions = best_positions(scores, rows >= 0, 10)
    top_rows, _ = top_k_rows(rows, scores, 10)
    np.testing.assert_array_equal(np.take_along_axis(rows, positions, axis=1), top_rows)
