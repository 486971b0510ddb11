"""compute_features on a hand-made catalog: every column by name, with values worked out here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.lexical import FIELDS, LexicalIndex
from ecomsearch.ranking.features import (
    FEATURE_COUNT,
    FEATURE_NAMES,
    QueryCandidates,
    compute_features,
    fused_score,
)

CATALOG = [
    Product(id="p0", title="Cordless drill 18 volt", brand="Makita"),
    Product(id="p1", title="Drill bits 1/4 in."),
    Product(id="p2", title="Claw hammer", description="Fits cordless tool belts"),
    Product(id="p3", title="Garden hose 50 ft"),
]
POOL = 4
# Candidates in an order that is not row order, so a feature read from the wrong row shows.
ROWS = np.array([2, 0, 3, 1], dtype=np.int64)
COSINE = np.array([0.7, 0.9, 0.1, 0.5], dtype=np.float32)
VECTOR_RANK = np.array([1, 0, POOL, 2])  # row 3 was not in the vector list
LEXICAL_RANK = np.array([2, 0, POOL, 1])  # row 3 was not in the BM25 list


@pytest.fixture(scope="module")
def lexical() -> LexicalIndex:
    return LexicalIndex.build(CATALOG)


def features_for(lexical: LexicalIndex, query: str) -> np.ndarray:
    terms = lexical.terms(query)
    bm25 = {field: lexical.scores(terms, field) for field in FIELDS}
    candidates = QueryCandidates(ROWS, COSINE, VECTOR_RANK, LEXICAL_RANK)
    features = compute_features(candidates, terms, bm25, lexical, POOL, POOL)
    assert features.shape == (len(ROWS), FEATURE_COUNT)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    return features


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, FEATURE_NAMES.index(name)]


def test_feature_names_are_distinct() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == FEATURE_COUNT


def test_cosine_and_its_gap_to_the_best(lexical) -> None:
    features = features_for(lexical, "cordless drill")
    np.testing.assert_array_equal(column(features, "cosine"), COSINE)
    gap = column(features, "cosine_gap")
    # The best cosine is 0.9: gaps are <= 0 and the best candidate's is exactly 0.
    np.testing.assert_allclose(gap, [-0.2, 0.0, -0.8, -0.4], atol=1e-6)
    assert gap.max() == 0.0 and (gap <= 0).all()


@pytest.mark.parametrize("field", FIELDS)
def test_bm25_columns_are_the_rows_scores_and_their_ratio_to_the_best(lexical, field) -> None:
    features = features_for(lexical, "cordless drill")
    scores = lexical.scores(lexical.terms("cordless drill"), field)
    raw, ratio = column(features, f"bm25_{field}"), column(features, f"bm25_{field}_ratio")

    np.testing.assert_array_equal(raw, scores[ROWS])
    assert ((ratio >= 0) & (ratio <= 1)).all()
    assert ratio.max() == 1.0
    # Row 0 (position 1) has both words and the best score; row 3 (position 2) has neither.
    assert ratio[1] == 1.0 and ratio[2] == 0.0
    np.testing.assert_allclose(ratio, raw / raw.max(), rtol=1e-6)


def test_bm25_ratios_are_zero_not_nan_when_nothing_matches(lexical) -> None:
    features = features_for(lexical, "zzzz")
    for name in ("bm25_text", "bm25_text_ratio", "bm25_title", "bm25_title_ratio"):
        assert not column(features, name).any(), name


def test_rank_columns_and_in_both_lists(lexical) -> None:
    features = features_for(lexical, "cordless drill")
    np.testing.assert_allclose(column(features, "vector_rank"), np.log1p(VECTOR_RANK), rtol=1e-6)
    np.testing.assert_allclose(column(features, "lexical_rank"), np.log1p(LEXICAL_RANK), rtol=1e-6)
    # Rank POOL means "not in that list": only row 3 (position 2) misses one.
    assert column(features, "in_both_lists").tolist() == [1, 1, 0, 1]


def test_coverage_of_a_two_token_query(lexical) -> None:
    # "cordless drill" -> tokens cordless, drill. Per candidate, in ROWS order (2, 0, 3, 1):
    #   title: row 2 "Claw hammer" 0/2; row 0 both 2/2; row 3 0/2; row 1 "Drill bits" 1/2
    #   text:  row 2 has "cordless" in its description 1/2; row 0 2/2; row 3 0/2; row 1 1/2
    features = features_for(lexical, "cordless drill")
    assert column(features, "title_coverage").tolist() == [0.0, 1.0, 0.0, 0.5]
    assert column(features, "text_coverage").tolist() == [0.5, 1.0, 0.0, 0.5]
    assert column(features, "query_tokens").tolist() == pytest.approx([math.log(3)] * 4)
    assert not column(features, "number_coverage").any()
    assert not column(features, "query_has_numbers").any()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # numbers: "18"; only row 0 (position 1) has it
        ("18 volt drill", [0.0, 1.0, 0.0, 0.0]),
        # numbers: "1/4" (a fraction stays one token); only row 1 (position 3)
        ("1/4 in. drill bits", [0.0, 0.0, 0.0, 1.0]),
        # numbers: "18", "50": row 0 has one of two, row 3 the other
        ("18 50", [0.0, 0.5, 0.5, 0.0]),
    ],
)
def test_number_coverage(lexical, query: str, expected: list[float]) -> None:
    features = features_for(lexical, query)
    assert column(features, "number_coverage").tolist() == expected
    assert column(features, "query_has_numbers").tolist() == [1.0] * 4


def test_fused_score_is_cosine_plus_the_text_ratio(lexical) -> None:
    features = features_for(lexical, "cordless drill")
    expected = column(features, "cosine") + column(features, "bm25_text_ratio")
    np.testing.assert_allclose(column(features, "fused_score"), expected, rtol=1e-6)
    np.testing.assert_array_equal(
        fused_score(np.array([0.5, -0.25]), np.array([1.0, 0.0])), np.float32([1.5, -0.25])
    )


def test_no_candidates_give_no_rows(lexical) -> None:
    terms = lexical.terms("drill")
    bm25 = {field: lexical.scores(terms, field) for field in FIELDS}
    empty = np.array([], dtype=np.int64)
    candidates = QueryCandidates(empty, np.array([], np.float32), empty, empty)
    assert compute_features(candidates, terms, bm25, lexical, POOL, POOL).shape == (
        0,
        FEATURE_COUNT,
    )


def test_idf_coverage_weighs_rare_query_words_more(lexical) -> None:
    # "drill" is in two titles (p0, p1), "hammer" in one (p2): a title with only the rarer word
    # covers more of the query's IDF mass, though both cover half of its words.
    features = features_for(lexical, "drill hammer")
    by_row = dict(zip(ROWS.tolist(), range(len(ROWS)), strict=True))
    coverage = column(features, "title_coverage")
    idf_coverage = column(features, "title_idf_coverage")
    assert coverage[by_row[1]] == coverage[by_row[2]] == 0.5
    idf = lambda df: math.log1p((len(CATALOG) - df + 0.5) / (df + 0.5))  # noqa: E731
    drill, hammer = idf(2), idf(1)
    assert idf_coverage[by_row[2]] == pytest.approx(hammer / (drill + hammer), rel=1e-5)
    assert idf_coverage[by_row[1]] == pytest.approx(drill / (drill + hammer), rel=1e-5)
    assert idf_coverage[by_row[2]] > idf_coverage[by_row[1]]
    assert idf_coverage[by_row[3]] == 0.0  # the hose has neither word


def test_idf_of_a_word_no_document_has_is_the_rarest(lexical) -> None:
    weights = lexical.idf("title", ["drill", "zzzz"])
    assert weights[1] > weights[0] > 0
