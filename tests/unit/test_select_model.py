"""model_repository/select/1/model.py driven through the fake backend module: the top-k
candidates by score become product ids, scores and titles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.index.manifest import IndexLoadError
from ecomsearch.serving.base import RequestError
from ecomsearch.serving.select import parse_top_k

# Enough products for the default top_k and a few more.
PRODUCTS = max(12, contract.DEFAULT_TOP_K + 4)


@pytest.fixture
def repo(tiny_repository_factory):
    return tiny_repository_factory(rows=PRODUCTS)


@pytest.fixture
def products(repo):
    return repo.index.products


def initialize(triton, model_dir: Path):
    """TritonPythonModel.initialize with the model directory's config.pbtxt."""
    args = triton.args(model_dir / "config.pbtxt", model_dir)
    return triton.initialize(model_dir / "1" / "model.py", args)


@pytest.fixture
def select(triton, repo):
    return initialize(triton, repo.select_dir)


def request(triton, rows, scores, top_k: int | list[int] | None = None):
    inputs = {
        contract.CANDIDATE_ROWS: np.array(rows, dtype=np.int64),
        contract.CANDIDATE_SCORES: np.array(scores, dtype=np.float32),
    }
    if top_k is not None:
        values = [top_k] * len(rows) if isinstance(top_k, int) else top_k
        inputs[contract.TOP_K] = np.array(values, dtype=np.int32).reshape(-1, 1)
    return triton.request(**inputs)


def assert_selected(triton, response, products, rows: list[list[int]], scores) -> None:
    """The response holds these product rows (-1: an empty slot) with these scores."""
    out = triton.outputs(response)
    assert set(out) == {contract.PRODUCT_IDS, contract.SCORES, contract.TITLES}
    shape = (len(rows), len(rows[0]))
    for name in (contract.PRODUCT_IDS, contract.TITLES):
        # TYPE_STRING outputs: object arrays of bytes.
        assert out[name].dtype == np.object_ and out[name].shape == shape, name
        assert all(isinstance(v, bytes) for v in out[name].flat), name
    assert out[contract.SCORES].dtype == np.float32 and out[contract.SCORES].shape == shape

    def field(row: int, name: str) -> bytes:
        return getattr(products[row], name).encode() if row >= 0 else b""

    assert out[contract.PRODUCT_IDS].tolist() == [[field(r, "id") for r in q] for q in rows]
    assert out[contract.TITLES].tolist() == [[field(r, "title") for r in q] for q in rows]
    np.testing.assert_allclose(out[contract.SCORES], np.array(scores, np.float32), rtol=0, atol=0)


def best(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[list[list[int]], np.ndarray]:
    """The expected selection, by plain sorting: real candidates only, highest score first."""
    picked, picked_scores = [], []
    for query_rows, query_scores in zip(rows.tolist(), scores.tolist(), strict=True):
        real = sorted(
            ((s, r) for r, s in zip(query_rows, query_scores, strict=True) if r >= 0),
            key=lambda pair: -pair[0],
        )[:k]
        real += [(-np.inf, -1)] * (min(k, len(query_rows)) - len(real))
        picked.append([r for _, r in real])
        picked_scores.append([s for s, _ in real])
    return picked, np.array(picked_scores, dtype=np.float32)


def random_candidates(seed: int, batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct product rows and distinct scores per query, with some padding (-1)."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(PRODUCTS)[:width] for _ in range(batch)]).astype(np.int64)
    rows[:, -2:] = -1
    scores = rng.permutation(batch * width).reshape(batch, width).astype(np.float32) / 10
    return rows, scores


def test_the_best_scores_come_first_and_padding_is_never_selected(triton, select, products) -> None:
    (response,) = select.execute(
        [request(triton, [[3, 7, -1, 5, 0, -1]], [[0.1, 0.9, 5.0, 0.5, 0.3, 99.0]], top_k=3)]
    )
    assert_selected(triton, response, products, [[7, 5, 0]], [[0.9, 0.5, 0.3]])


def test_titles_are_utf8_bytes(triton, select, products) -> None:
    assert products[1].title == "Café mug"
    (response,) = select.execute([request(triton, [[1, 2]], [[2.0, 1.0]], top_k=1)])
    assert triton.outputs(response)[contract.TITLES].tolist() == [["Café mug".encode()]]


def test_without_top_k_the_default_is_used(triton, select, products) -> None:
    rows, scores = random_candidates(seed=1, batch=2, width=PRODUCTS)
    k = contract.DEFAULT_TOP_K

    (response,) = select.execute([request(triton, rows, scores)])

    assert_selected(triton, response, products, *best(rows, scores, k))
    assert triton.outputs(response)[contract.PRODUCT_IDS].shape == (2, k)


def test_requests_with_different_top_k_in_one_execute(triton, select, products) -> None:
    batches = [(random_candidates(seed, batch, 9), k) for seed, batch, k in [(2, 2, 2), (3, 1, 5)]]
    batches.append((random_candidates(4, 3, 9), None))

    responses = select.execute([request(triton, *c, top_k=k) for c, k in batches])

    assert len(responses) == len(batches)
    for response, ((rows, scores), k) in zip(responses, batches, strict=True):
        k = contract.DEFAULT_TOP_K if k is None else k
        assert_selected(triton, response, products, *best(rows, scores, k))


def test_requests_with_different_candidate_widths_in_one_execute(triton, select, products) -> None:
    batches = [(random_candidates(5, 2, 6), 3), (random_candidates(6, 1, 11), 4)]

    responses = select.execute([request(triton, *c, top_k=k) for c, k in batches])

    for response, ((rows, scores), k) in zip(responses, batches, strict=True):
        assert_selected(triton, response, products, *best(rows, scores, k))


def test_fewer_candidates_than_k_leave_empty_slots(triton, select, products) -> None:
    (response,) = select.execute(
        [request(triton, [[4, -1, -1, 2, -1, -1]], [[0.2, 9, 9, 0.7, 9, 9]], top_k=4)]
    )
    # Empty ids and titles with -inf scores: never another product, never a padding score.
    assert_selected(triton, response, products, [[2, 4, -1, -1]], [[0.7, 0.2, -np.inf, -np.inf]])


def test_a_query_with_no_candidates_gets_only_empty_slots(triton, select, products) -> None:
    (response,) = select.execute(
        [request(triton, [[-1, -1, -1], [6, -1, 8]], [[1, 2, 3], [0.5, 7, 0.25]], top_k=2)]
    )
    assert_selected(
        triton, response, products, [[-1, -1], [6, 8]], [[-np.inf, -np.inf], [0.5, 0.25]]
    )


# case -> (the largest k -> (request arguments, fragments of the message)).
BAD_REQUESTS = {
    "top-k-0": lambda m: ({"top_k": 0}, [f"between 1 and {m}", "got 0"]),
    "top-k-negative": lambda m: ({"top_k": -3}, [f"between 1 and {m}", "got -3"]),
    "top-k-above-max": lambda m: ({"top_k": m + 1}, [f"between 1 and {m}", f"got {m + 1}"]),
    "top-k-differs-within-request": lambda m: (
        {"rows": [[1, 2], [3, 4]], "scores": [[1, 2], [3, 4]], "top_k": [2, 3]},
        ["same for every query"],
    ),
    "top-k-wrong-rows": lambda m: (
        {"top_k": [2, 2]},
        ["'top_k'", "shape [1, 1]"],
    ),
    "row-out-of-range": lambda m: (
        {"rows": [[0, PRODUCTS]], "scores": [[1, 2]]},
        ["out of range", str(PRODUCTS)],
    ),
    "row-negative": lambda m: (
        {"rows": [[0, -2]], "scores": [[1, 2]]},
        ["out of range", "-1 (padding)"],
    ),
    "row-far-negative": lambda m: (
        {"rows": [[-(2**62), 1]], "scores": [[1, 2]]},
        ["out of range"],
    ),
    "score-nan": lambda m: (
        {"rows": [[0, 1]], "scores": [[np.nan, 2]]},
        ["finite"],
    ),
    "score-infinite": lambda m: (
        {"rows": [[0, 1]], "scores": [[1, np.inf]]},
        ["finite"],
    ),
    "too-many-candidates": lambda m: (
        {
            "rows": np.zeros((1, contract.MAX_CANDIDATES + 1), np.int64),
            "scores": np.zeros((1, contract.MAX_CANDIDATES + 1), np.float32),
        },
        ["candidates", str(contract.MAX_CANDIDATES)],
    ),
    "rows-and-scores-differ": lambda m: (
        {"rows": [[0, 1, 2]], "scores": [[1, 2]]},
        ["must be equal"],
    ),
    "no-candidates": lambda m: (
        {"rows": np.zeros((1, 0)), "scores": np.zeros((1, 0))},
        ["must be equal"],
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_invalid_arg_and_its_neighbours_succeed(
    triton, select, products, case: str
) -> None:
    changes, fragments = BAD_REQUESTS[case](contract.MAX_TOP_K)
    bad = {"rows": [[0, 1]], "scores": [[1.0, 2.0]], "top_k": 1, **changes}
    good = [random_candidates(7, 2, 8), random_candidates(8, 1, 8)]
    requests = [
        request(triton, *good[0], top_k=3),
        request(triton, bad["rows"], bad["scores"], top_k=bad["top_k"]),
        request(triton, *good[1], top_k=2),
    ]

    responses = select.execute(requests)

    assert len(responses) == 3
    assert_selected(triton, responses[0], products, *best(*good[0], 3))
    triton.assert_invalid_arg(responses[1], *fragments)
    assert_selected(triton, responses[2], products, *best(*good[1], 2))


@pytest.mark.parametrize("missing", [contract.CANDIDATE_ROWS, contract.CANDIDATE_SCORES])
def test_a_missing_input_gets_invalid_arg(triton, select, missing: str) -> None:
    inputs = {
        contract.CANDIDATE_ROWS: np.array([[0, 1]], np.int64),
        contract.CANDIDATE_SCORES: np.array([[1, 2]], np.float32),
    }
    del inputs[missing]
    (response,) = select.execute([triton.request(**inputs)])
    triton.assert_invalid_arg(response, "required")


def test_initialize_refuses_a_missing_index(triton, repo) -> None:
    (repo.layout.index_dir / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="no index"):
        initialize(triton, repo.select_dir)


def test_a_requests_results_do_not_depend_on_its_neighbours(triton, select, products) -> None:
    rows = [list(range(PRODUCTS))]
    scores = [[1.0] * PRODUCTS]  # every candidate tied, as with a constant ranker

    (alone,) = select.execute([request(triton, rows, scores, top_k=2)])
    batched, _ = select.execute(
        [request(triton, rows, scores, top_k=2), request(triton, rows, scores, top_k=5)]
    )

    ids = contract.PRODUCT_IDS
    assert triton.outputs(batched)[ids].tolist() == triton.outputs(alone)[ids].tolist()


def test_parse_top_k() -> None:
    assert parse_top_k(None, batch=3) == contract.DEFAULT_TOP_K
    assert parse_top_k(np.array([[7], [7]], np.int32), batch=2) == 7
    top = contract.MAX_TOP_K
    assert parse_top_k(np.array([[top]], np.int32), batch=1) == top
    with pytest.raises(RequestError, match=f"between 1 and {top}"):
        parse_top_k(np.array([[top + 1]], np.int32), batch=1)
