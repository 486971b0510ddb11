"""HybridRetriever over a tiny hand-made index (vector top-N + BM25 top-N, merged and
featurised), and top_rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import LexicalIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.ranking.candidates import HybridRetriever, top_rows
from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES

DIMENSION = 8
CATALOG = [
    Product(id="p0", title="Cordless drill"),
    Product(id="p1", title="Hammer drill"),
    Product(id="p2", title="Claw hammer"),
    Product(id="p3", title="Garden hose"),
    Product(id="p4", title="Drill bit set"),
    Product(id="p5", title="Paint roller"),
    Product(id="p6", title="Extension cord"),
    Product(id="p7", title="Drill press stand"),
    Product(id="p8", title="Cordless leaf blower"),
    Product(id="p9", title="Wood screw pack"),
]
DRILL_ROWS = {0, 1, 4, 7}


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[..., FEATURE_NAMES.index(name)]


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    vectors = np.random.default_rng(42).normal(size=(len(CATALOG), DIMENSION))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def index(tmp_path: Path, tiny_index_factory, embeddings) -> CatalogIndex:
    tiny = tiny_index_factory(
        tmp_path / "index", "encoder", products=CATALOG, embeddings=embeddings
    )
    return CatalogIndex.load(tiny.index_dir)


def retriever(index: CatalogIndex, vector_pool: int, lexical_pool: int) -> HybridRetriever:
    return HybridRetriever(LiveCatalog.load(index), vector_pool, lexical_pool)


def query_near(embeddings: np.ndarray, row: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 0.2, DIMENSION)
    query = embeddings[row] + noise
    return (query / np.linalg.norm(query)).astype(np.float32)[None]


def exact_top(embeddings: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(embeddings @ query[0]), kind="stable")[:k].tolist()


def test_union_has_vector_candidates_first_then_lexical_only_ones(index, embeddings) -> None:
    query = query_near(embeddings, 5, seed=1)  # near "Paint roller"
    vector = exact_top(embeddings, query, 3)

    batch = retriever(index, 3, 4).retrieve(["drill"], query)

    rows = batch.rows[0]
    real = rows[rows >= 0].tolist()
    assert len(real) == len(set(real)), "a candidate appears twice"
    assert real[:3] == vector
    assert set(real[3:]) == DRILL_ROWS - set(vector)
    assert set(real) == set(vector) | DRILL_ROWS
    # Padding fills the rest of the fixed width.
    assert batch.rows.shape == (1, 7) and (rows[len(real) :] == -1).all()
    assert batch.features.shape == (1, 7, FEATURE_COUNT)
    assert not batch.features[0, len(real) :].any()
    assert np.isneginf(batch.retrieval_scores[0, len(real) :]).all()
    np.testing.assert_array_equal(
        batch.retrieval_scores[0, : len(real)],
        column(batch.features[0, : len(real)], "fused_score"),
    )


def test_a_product_in_both_lists_appears_once_as_a_vector_candidate(index, embeddings) -> None:
    query = query_near(embeddings, 4, seed=2)  # near "Drill bit set", which has "drill"
    vector = exact_top(embeddings, query, 3)
    assert vector[0] == 4

    batch = retriever(index, 3, 4).retrieve(["drill"], query)

    rows = batch.rows[0].tolist()
    assert rows.count(4) == 1 and rows.index(4) == 0
    in_both = column(batch.features[0], "in_both_lists")
    for position, row in enumerate(rows):
        if row >= 0:
            assert in_both[position] == (row in vector and row in DRILL_ROWS), row


def test_lexical_only_cosine_is_the_dot_product_with_the_stored_vector(index, embeddings) -> None:
    query = query_near(embeddings, 9, seed=3)
    batch = retriever(index, 2, 4).retrieve(["drill"], query)

    rows = batch.rows[0]
    lexical_only = rows[2:][rows[2:] >= 0]
    assert len(lexical_only) >= 2, "test setup: expected lexical-only candidates"
    cosine = column(batch.features[0], "cosine")
    stored = np.stack([index.faiss_index.reconstruct(int(r)) for r in lexical_only])
    np.testing.assert_allclose(cosine[2 : 2 + len(lexical_only)], stored @ query[0], atol=1e-6)
    # The whole list: the cosine is each product's true dot product with the query.
    real = rows[rows >= 0]
    np.testing.assert_allclose(cosine[: len(real)], embeddings[real] @ query[0], atol=1e-6)


def test_rank_features_follow_each_list(index, embeddings) -> None:
    lexical = index.load_lexical()
    query = query_near(embeddings, 2, seed=4)
    vector = exact_top(embeddings, query, 3)
    bm25_order = top_rows(lexical.scores(lexical.terms("cordless drill"), "text"), 2)

    batch = retriever(index, 3, 2).retrieve(["cordless drill"], query)

    rows = batch.rows[0].tolist()
    for position, row in enumerate(rows):
        if row < 0:
            continue
        vector_rank = vector.index(row) if row in vector else 3
        lexical_rank = bm25_order.tolist().index(row) if row in bm25_order else 2
        features = batch.features[0, position]
        assert column(features, "vector_rank") == pytest.approx(np.log1p(vector_rank)), row
        assert column(features, "lexical_rank") == pytest.approx(np.log1p(lexical_rank)), row


def test_the_lexical_pool_keeps_the_best_bm25_matches(index, embeddings) -> None:
    lexical = index.load_lexical()
    scores = lexical.scores(lexical.terms("drill"), "text")
    best_two = set(np.argsort(-scores, kind="stable")[:2].tolist())
    query = query_near(embeddings, 6, seed=5)
    vector = exact_top(embeddings, query, 2)

    batch = retriever(index, 2, 2).retrieve(["drill"], query)

    rows = batch.rows[0]
    assert set(rows[rows >= 0].tolist()) == set(vector) | best_two


def test_a_vector_pool_above_the_catalog_size_holds_every_product(index, embeddings) -> None:
    query = query_near(embeddings, 3, seed=6)
    pool = len(CATALOG) + 5
    batch = retriever(index, pool, 3).retrieve(["drill"], query)
    assert batch.rows.shape == (1, pool + 3)
    assert batch.rows[0, : len(CATALOG)].tolist() == exact_top(embeddings, query, len(CATALOG))
    assert (batch.rows[0, len(CATALOG) :] == -1).all()


def test_queries_of_a_batch_are_independent(index, embeddings) -> None:
    queries = ["drill", "garden hose", "zzzz"]
    vectors = np.concatenate([query_near(embeddings, r, seed=7 + r) for r in (1, 3, 8)])
    hybrid = retriever(index, 3, 3)

    together = hybrid.retrieve(queries, vectors)

    for i, query in enumerate(queries):
        alone = hybrid.retrieve([query], vectors[i : i + 1])
        np.testing.assert_array_equal(together.rows[i], alone.rows[0])
        np.testing.assert_array_equal(together.features[i], alone.features[0])
        np.testing.assert_array_equal(together.retrieval_scores[i], alone.retrieval_scores[0])


def test_a_lexical_index_of_another_catalog_is_refused(index) -> None:
    with pytest.raises(ValueError, match="documents"):
        LiveCatalog(index, LexicalIndex.build(CATALOG[:3]))


def test_in_both_lists_with_unequal_pools(index, embeddings) -> None:
    query = query_near(embeddings, 5, seed=8)
    vector = exact_top(embeddings, query, 5)

    batch = retriever(index, 5, 2).retrieve(["zzzz"], query)  # nothing matches lexically

    assert batch.rows[0, :5].tolist() == vector
    assert not column(batch.features[0], "in_both_lists").any()


# top_rows: the rows of the k best positive scores, best first, ties by row.


def test_top_rows_orders_best_first_and_keeps_only_positive_scores() -> None:
    scores = np.array([0.0, 3.0, -1.0, 0.5, 7.0, 0.0, 2.0], np.float32)
    assert top_rows(scores, 10).tolist() == [4, 1, 6, 3]
    assert top_rows(scores, 2).tolist() == [4, 1]
    assert top_rows(np.zeros(5, np.float32), 3).tolist() == []


def test_top_rows_breaks_ties_by_row_when_every_positive_fits() -> None:
    scores = np.array([1.0, 2.0, 1.0, 0.0, 2.0, 1.0], np.float32)
    assert top_rows(scores, 5).tolist() == [1, 4, 0, 2, 5]


def test_top_rows_breaks_ties_by_row_at_the_cutoff() -> None:
    scores = np.ones(20, np.float32)
    scores[7] = 2.0
    for k in range(1, 20):
        expected = [7, *[r for r in range(20) if r != 7]][:k]
        assert top_rows(scores, k).tolist() == expected, k
