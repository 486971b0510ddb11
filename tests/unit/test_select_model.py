"""model_repository/select/1/model.py driven through the fake backend module: the top-k
candidates by score become product ids, scores, titles, prices and stock, for a static index
(candidate rows are its rows) and for a live catalog store (candidate rows are store keys)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.catalog import Product
from ecomsearch.index.manifest import IndexLoadError
from ecomsearch.serving.base import RequestError
from ecomsearch.serving.select import parse_top_k
from ecomsearch.store import product_write

# Enough products for the default top_k and a few more.
PRODUCTS = max(12, contract.DEFAULT_TOP_K + 4)


def catalog() -> list[Product]:
    """PRODUCTS products, some without a price and some out of stock; one title non-ASCII."""
    return [
        Product(
            id=f"sku-{i:03d}",
            title="Café mug" if i == 1 else f"Product {i}",
            price=None if i % 3 == 0 else 1.25 * i,
            in_stock=i % 4 != 2,
        )
        for i in range(PRODUCTS)
    ]


@pytest.fixture
def repo(tiny_repository_factory):
    return tiny_repository_factory(products=catalog())


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
    assert set(out) == {
        contract.PRODUCT_IDS,
        contract.SCORES,
        contract.TITLES,
        contract.PRICES,
        contract.IN_STOCK,
        contract.EXPLANATIONS,
    }
    shape = (len(rows), len(rows[0]))
    # Nobody asked for explanations: every entry is empty.
    assert out[contract.EXPLANATIONS].shape == shape
    assert set(out[contract.EXPLANATIONS].flat) == {b""}
    for name in (contract.PRODUCT_IDS, contract.TITLES):
        # TYPE_STRING outputs: object arrays of bytes.
        assert out[name].dtype == np.object_ and out[name].shape == shape, name
        assert all(isinstance(v, bytes) for v in out[name].flat), name
    assert out[contract.SCORES].dtype == np.float32 and out[contract.SCORES].shape == shape
    assert out[contract.PRICES].dtype == np.float32 and out[contract.PRICES].shape == shape
    assert out[contract.IN_STOCK].dtype == np.bool_ and out[contract.IN_STOCK].shape == shape

    def field(row: int, name: str) -> bytes:
        return getattr(products[row], name).encode() if row >= 0 else b""

    def price(row: int) -> float:
        # NaN: no price, or an empty slot.
        return np.nan if row < 0 or products[row].price is None else products[row].price

    assert out[contract.PRODUCT_IDS].tolist() == [[field(r, "id") for r in q] for q in rows]
    assert out[contract.TITLES].tolist() == [[field(r, "title") for r in q] for q in rows]
    np.testing.assert_allclose(out[contract.SCORES], np.array(scores, np.float32), rtol=0, atol=0)
    expected_prices = np.array([[price(r) for r in q] for q in rows], dtype=np.float32)
    np.testing.assert_array_equal(out[contract.PRICES], expected_prices)  # NaN equals NaN here
    in_stock = [[r >= 0 and products[r].in_stock for r in q] for q in rows]
    assert out[contract.IN_STOCK].tolist() == in_stock


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


def test_prices_and_stock_are_the_products(triton, select, products) -> None:
    # Row 3 has no price and row 2 is out of stock: NaN and False, not 0 or a neighbour's.
    assert products[3].price is None and products[3].in_stock and not products[2].in_stock
    (response,) = select.execute([request(triton, [[3, 2, 5, -1]], [[3.0, 2.0, 1.0, 0.0]])])
    out = triton.outputs(response)
    assert out[contract.PRICES].tolist()[0][1:3] == [2.5, 6.25]
    assert np.isnan(out[contract.PRICES][0, [0, 3]]).all()
    assert out[contract.IN_STOCK][0, :4].tolist() == [True, False, True, False]


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
        ["-1 (padding) or product keys", f"{PRODUCTS} is neither"],
    ),
    "row-negative": lambda m: (
        {"rows": [[0, -2]], "scores": [[1, 2]]},
        ["-1 (padding) or product keys", "-2 is neither"],
    ),
    "row-far-negative": lambda m: (
        {"rows": [[-(2**62), 1]], "scores": [[1, 2]]},
        [f"{-(2**62)} is neither"],
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


# A live catalog: the index was built from a catalog store, which select follows.


class LiveSelect:
    """select over a SQLite catalog store holding catalog(), and the test's own connection."""

    def __init__(self, triton, repo, store_path: Path, poll_interval_ms: int) -> None:
        from ecomsearch.index.builder import store_snapshot, write_index
        from ecomsearch.store import open_store

        self.triton, self.repo = triton, repo
        self.store = open_store(store_path)
        self.dimension = repo.index.manifest.dimension
        result = self.store.upsert(
            [product_write(p) for p in catalog()],
            self.vectors(PRODUCTS),
            repo.encoder_fingerprint,
        )
        self.keys = list(result.keys)  # keys[i] is catalog()[i]'s: store keys, not rows
        write_index(repo.layout.index_dir, store_snapshot(self.store, "test catalog"))
        triton.set_parameters(
            repo.select_dir / "config.pbtxt", catalog_poll_interval_ms=poll_interval_ms
        )
        self.model = initialize(triton, repo.select_dir)

    def vectors(self, count: int) -> np.ndarray:
        vectors = np.random.default_rng(count).normal(size=(count, self.dimension))
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def upsert(self, *products: Product) -> list[int]:
        written = self.store.upsert(
            [product_write(p) for p in products],
            self.vectors(len(products)),
            self.repo.encoder_fingerprint,
        )
        return list(written.keys)

    def wait_for(self, condition, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "select did not follow the store in time"
            time.sleep(0.01)

    def select(self, keys: list[int], scores: list[float], top_k: int) -> dict[str, list]:
        (response,) = self.model.execute([request(self.triton, [keys], [scores], top_k=top_k)])
        return {name: values[0].tolist() for name, values in self.triton.outputs(response).items()}


@pytest.fixture
def live_select(triton, repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """LiveSelect(poll_interval_ms); every model made is finalized after the test."""
    from ecomsearch.live.location import STORE_URL_ENV

    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    made: list[LiveSelect] = []

    def make(poll_interval_ms: int = 10) -> LiveSelect:
        made.append(LiveSelect(triton, repo, tmp_path / "catalog.sqlite3", poll_interval_ms))
        return made[-1]

    yield make
    for live in made:
        live.model.finalize()
        live.store.close()


def test_a_live_catalog_labels_store_keys(live_select) -> None:
    live = live_select()
    products, keys = catalog(), live.keys
    assert sorted(keys) != list(range(PRODUCTS)), "test setup: keys must not be the rows"

    out = live.select([keys[4], keys[3], -1, keys[2]], [0.5, 0.9, 9.0, 0.1], top_k=3)

    assert out[contract.PRODUCT_IDS] == [products[i].id.encode() for i in (3, 4, 2)]
    assert out[contract.SCORES] == pytest.approx([0.9, 0.5, 0.1])
    assert np.isnan(out[contract.PRICES][0]) and out[contract.PRICES][1:] == [5.0, 2.5]
    assert out[contract.IN_STOCK] == [True, True, False]


def test_changes_in_the_store_show_and_deleted_products_are_dropped(live_select) -> None:
    live = live_select()
    products, keys = catalog(), live.keys
    changed = Product(id=products[4].id, title="Product 4, new model", price=9.5, in_stock=False)
    assert live.upsert(changed) == [keys[4]], "a product keeps its key when it changes"
    live.store.delete([products[5].id])

    def selected() -> dict[str, list]:
        return live.select([keys[5], keys[4], keys[7]], [3.0, 2.0, 1.0], top_k=2)

    # The deleted product is dropped before the top-k, so the next best takes its place.
    survivors = [products[4].id.encode(), products[7].id.encode()]
    live.wait_for(lambda: selected()[contract.PRODUCT_IDS] == survivors)
    out = selected()
    assert out[contract.TITLES] == [b"Product 4, new model", products[7].title.encode()]
    assert out[contract.PRICES] == [9.5, 8.75]
    assert out[contract.IN_STOCK] == [False, True]


def test_a_key_newer_than_the_last_poll_is_caught_up_not_refused(live_select) -> None:
    live = live_select(poll_interval_ms=600_000)  # the follower polls once, at start
    follower = live.model.model.follower
    live.wait_for(lambda: follower.last_poll_monotonic is not None)
    (key,) = live.upsert(Product(id="sku-new", title="Brand new", price=1.5))
    assert not live.model.model.labels.known(np.array([key])).all(), "already followed"

    out = live.select([key, live.keys[1]], [2.0, 1.0], top_k=2)

    assert out[contract.PRODUCT_IDS] == [b"sku-new", b"sku-001"]
    assert out[contract.PRICES] == [1.5, 1.25]


def test_a_key_the_store_never_gave_is_refused_and_the_neighbours_succeed(
    triton, live_select
) -> None:
    live = live_select()
    unknown = max(live.keys) + 100
    requests = [
        request(triton, [[live.keys[1]]], [[1.0]], top_k=1),
        request(triton, [[live.keys[1], unknown]], [[1.0, 2.0]], top_k=1),
        request(triton, [[live.keys[2]]], [[1.0]], top_k=1),
    ]

    first, bad, last = live.model.execute(requests)

    assert triton.outputs(first)[contract.PRODUCT_IDS].tolist() == [[b"sku-001"]]
    triton.assert_invalid_arg(bad, "product keys", f"{unknown} is neither")
    assert triton.outputs(last)[contract.PRODUCT_IDS].tolist() == [[b"sku-002"]]


def test_finalize_stops_following_the_store(live_select) -> None:
    live = live_select()
    thread = live.model.model.follower._thread
    assert thread.is_alive()
    live.model.finalize()
    assert not thread.is_alive()


# Personalised search: a user id raises each score by the shopper's affinity (the event log).


def personal_request(triton, keys: list[int], scores: list[float], user_id: str | bytes):
    user = user_id if isinstance(user_id, bytes) else user_id.encode()
    return triton.request(
        **{
            contract.CANDIDATE_ROWS: np.array([keys], dtype=np.int64),
            contract.CANDIDATE_SCORES: np.array([scores], dtype=np.float32),
            contract.TOP_K: np.array([[len(keys)]], dtype=np.int32),
            contract.USER_ID: np.array([[user]], dtype=object),
        }
    )


def test_a_user_id_raises_what_that_shopper_bought_and_leaves_others_alone(
    triton, live_select
) -> None:
    from ecomsearch.recommend.personal import PERSONAL_WEIGHT
    from ecomsearch.store import Event

    live = live_select()
    products, keys = catalog(), live.keys
    # shopper-a bought product 3 in two baskets (a day apart) after select started.
    for day in (0, 1):
        live.store.record_events(
            [Event("shopper-a", products[3].id, "purchase", 1e9 + day * 86400)]
        )
    candidates, scores = [keys[1], keys[2], keys[3]], [2.0, 1.0, 0.5]
    requests = [
        personal_request(triton, candidates, scores, "shopper-a"),
        personal_request(triton, candidates, scores, "nobody"),  # unknown: as it was
        personal_request(triton, candidates, scores, ""),  # no shopper: as it was
        request(triton, [candidates], [scores], top_k=3),  # no user id input at all
    ]

    personal, unknown, anonymous, plain = live.model.execute(requests)

    out = triton.outputs(personal)
    assert out[contract.PRODUCT_IDS][0].tolist() == [products[i].id.encode() for i in (3, 1, 2)]
    boosted = 0.5 + PERSONAL_WEIGHT * np.log1p(2)  # two baskets held product 3
    assert out[contract.SCORES][0].tolist() == pytest.approx([boosted, 2.0, 1.0])
    for response in (unknown, anonymous, plain):
        assert triton.outputs(response)[contract.PRODUCT_IDS][0].tolist() == [
            products[i].id.encode() for i in (1, 2, 3)
        ]
        assert triton.outputs(response)[contract.SCORES][0].tolist() == pytest.approx(scores)


def test_a_bad_user_id_gets_invalid_arg_and_its_neighbours_succeed(triton, live_select) -> None:
    live = live_select()
    keys = live.keys
    good = personal_request(triton, [keys[1]], [1.0], "shopper-b")
    long = personal_request(triton, [keys[1]], [1.0], "u" * (contract.MAX_USER_ID_BYTES + 1))
    utf8 = personal_request(triton, [keys[1]], [1.0], b"shopper \xc3\x28")

    first, too_long, not_utf8 = live.model.execute([good, long, utf8])

    assert triton.outputs(first)[contract.PRODUCT_IDS].tolist() == [[b"sku-001"]]
    triton.assert_invalid_arg(too_long, "longer than")
    triton.assert_invalid_arg(not_utf8, "UTF-8")


# --- explain -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree_ranker_file(tmp_path_factory) -> Path:
    """A small LightGBM ranker over the real feature count, saved as the export saves it."""
    import lightgbm

    from ecomsearch.ranking.features import FEATURE_COUNT

    rng = np.random.default_rng(0)
    features = rng.normal(size=(3000, FEATURE_COUNT))
    labels = np.clip(np.rint(features[:, 0] + 0.5 * features[:, 2]), 0, 2).astype(int)
    booster = lightgbm.train(
        {"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 20, "seed": 0},
        lightgbm.Dataset(features, labels, group=[30] * 100),
        num_boost_round=30,
    )
    path = tmp_path_factory.mktemp("ranker") / "model.txt"
    booster.save_model(str(path))
    return path


def explain_request(triton, rows, scores, features, explain: list[bool], top_k: int = 3):
    return triton.request(
        **{
            contract.CANDIDATE_ROWS: np.array(rows, dtype=np.int64),
            contract.CANDIDATE_SCORES: np.array(scores, dtype=np.float32),
            contract.CANDIDATE_FEATURES: np.array(features, dtype=np.float32),
            contract.EXPLAIN: np.array(explain, dtype=bool).reshape(-1, 1),
            contract.TOP_K: np.full((len(rows), 1), top_k, dtype=np.int32),
        }
    )


@pytest.fixture
def explaining_select(triton, repo, tree_ranker_file):
    from ecomsearch.paths import ModelRepositoryLayout

    target = ModelRepositoryLayout(repo.select_dir.parent).ranker_tree_model
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(tree_ranker_file.read_bytes())
    return initialize(triton, repo.select_dir)


def tree_scores(tree_ranker_file: Path, features: np.ndarray) -> np.ndarray:
    import lightgbm

    booster = lightgbm.Booster(model_file=str(tree_ranker_file))
    flat = features.reshape(-1, features.shape[-1])
    return booster.predict(flat, raw_score=True).reshape(features.shape[:-1]).astype(np.float32)


def test_explanations_sum_to_each_hits_score_and_follow_the_features(
    triton, explaining_select, tree_ranker_file
):
    import json

    from ecomsearch.ranking.explain import explained_total
    from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES

    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 6, FEATURE_COUNT)).astype(np.float32)
    scores = tree_scores(tree_ranker_file, features)
    rows = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, -1]]
    first, second = explaining_select.execute(
        [
            explain_request(triton, rows, scores, features, [True, False]),
            explain_request(triton, rows[:1], scores[:1], features[:1], [True]),
        ]
    )
    out = triton.outputs(first)
    explained = [json.loads(text) for text in out[contract.EXPLANATIONS][0]]
    assert set(out[contract.EXPLANATIONS][1].flat) == {b""}  # the second query did not ask
    for record, score in zip(explained, out[contract.SCORES][0], strict=True):
        assert record["score"] == pytest.approx(float(score), abs=1e-5)
        assert explained_total(record) == pytest.approx(float(score), abs=1e-4)
        assert list(record["contributions"]) == sorted(
            record["contributions"], key=lambda n: -abs(record["contributions"][n])
        )
        assert set(record["feature_values"]) == set(FEATURE_NAMES)
    # The same query alone gets the same explanations.
    assert triton.outputs(second)[contract.EXPLANATIONS][0].tolist() == (
        out[contract.EXPLANATIONS][0].tolist()
    )

    # More of the feature the trees rely on most: its contribution grows, the sum still holds.
    top_row = int(out[contract.PRODUCT_IDS][0][0].decode().split("-")[1])
    changed = features.copy()
    changed[0, top_row, 0] += 2.0
    changed_scores = tree_scores(tree_ranker_file, changed)
    (response,) = explaining_select.execute(
        [explain_request(triton, rows[:1], changed_scores[:1], changed[:1], [True], top_k=6)]
    )
    again = triton.outputs(response)
    records = {
        pid.decode(): json.loads(text)
        for pid, text in zip(
            again[contract.PRODUCT_IDS][0], again[contract.EXPLANATIONS][0], strict=True
        )
    }
    before = explained[0]
    after = records[f"sku-{top_row:03d}"]
    assert after["contributions"][FEATURE_NAMES[0]] > before["contributions"][FEATURE_NAMES[0]]
    assert explained_total(after) == pytest.approx(after["score"], abs=1e-4)


def test_explain_without_features_is_a_bad_request(triton, explaining_select):
    bare = triton.request(
        **{
            contract.CANDIDATE_ROWS: np.array([[0, 1]], dtype=np.int64),
            contract.CANDIDATE_SCORES: np.array([[0.5, 0.1]], dtype=np.float32),
            contract.EXPLAIN: np.array([[True]]),
        }
    )
    fine = request(triton, [[0, 1]], [[0.5, 0.1]])
    bad, good = explaining_select.execute([bare, fine])
    triton.assert_invalid_arg(bad, "explain", "features")
    triton.outputs(good)


def test_explain_without_a_tree_model_is_a_bad_request_and_search_goes_on(triton, select):
    """A server whose ranker has no model.txt (an MLP): INVALID_ARG, the model keeps serving."""
    features = np.zeros((1, 2, 17), dtype=np.float32)
    asked = explain_request(triton, [[0, 1]], [[0.5, 0.1]], features, [True], top_k=2)
    (response,) = select.execute([asked])
    triton.assert_invalid_arg(response, "explanations are unavailable")
    triton.outputs(select.execute([request(triton, [[0, 1]], [[0.5, 0.1]])])[0])


# --- rerank ------------------------------------------------------------------------------------


class TitleMatcher:
    """A stand-in cross-encoder: +4 when the title contains the query, -4 otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, queries, titles):
        self.calls.append((list(queries), list(titles)))
        return np.array(
            [4.0 if q in t else -4.0 for q, t in zip(queries, titles, strict=True)], np.float32
        )


@pytest.fixture
def reranking_select(triton, repo, tiny_checkpoint):
    """select with the served tokenizer in place, its cross-encoder call replaced by the
    TitleMatcher (the BLS call itself is served in tests/integration/test_search.py)."""
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.serving.rerank import CrossEncoderScorer

    tokenizer_dir = ModelRepositoryLayout(repo.select_dir.parent).tokenizer_dir
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "tokenizer.json").write_bytes(
        (tiny_checkpoint / "tokenizer.json").read_bytes()
    )
    model = initialize(triton, repo.select_dir)
    assert isinstance(model.model.relevance, CrossEncoderScorer)
    assert model.model.rerank_depth == 0  # the CPU profile's default
    model.model.relevance = TitleMatcher()
    return model


def rerank_request(triton, rows, scores, queries, depths=None, top_k=3, features=None):
    inputs = {
        contract.CANDIDATE_ROWS: np.array(rows, dtype=np.int64),
        contract.CANDIDATE_SCORES: np.array(scores, dtype=np.float32),
        contract.TOP_K: np.full((len(rows), 1), top_k, dtype=np.int32),
        contract.QUERY: np.array([[q.encode()] for q in queries], dtype=object),
    }
    if depths is not None:
        inputs[contract.RERANK_DEPTH] = np.array(depths, dtype=np.int32).reshape(-1, 1)
    if features is not None:
        inputs[contract.CANDIDATE_FEATURES] = np.array(features, dtype=np.float32)
        inputs[contract.EXPLAIN] = np.ones((len(rows), 1), dtype=bool)
    return triton.request(**inputs)


def ids_of(triton, response) -> list[list[str]]:
    return [[i.decode() for i in row] for row in triton.outputs(response)[contract.PRODUCT_IDS]]


def test_a_rerank_reorders_the_best_candidates_by_the_cross_encoder(triton, reranking_select):
    rows = [[1, 2, 3, 4, 5, 6]]
    scores = [[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    # "Product 4" is the ranker's fourth: a depth of 4 reaches it, a depth of 3 does not.
    deep, shallow, off, default = reranking_select.execute(
        [
            rerank_request(triton, rows, scores, ["Product 4"], depths=[4]),
            rerank_request(triton, rows, scores, ["Product 4"], depths=[3]),
            rerank_request(triton, rows, scores, ["Product 4"], depths=[0]),
            rerank_request(triton, rows, scores, ["Product 4"]),  # the CPU default: none
        ]
    )
    assert ids_of(triton, deep) == [["sku-004", "sku-001", "sku-002"]]
    assert ids_of(triton, shallow) == [["sku-001", "sku-002", "sku-003"]]
    assert ids_of(triton, off) == ids_of(triton, default) == [["sku-001", "sku-002", "sku-003"]]
    # Only the reranked candidates were read, with their titles, in one call per execution.
    (call,) = reranking_select.model.relevance.calls
    assert sorted(call[1]) == sorted(
        # the depth-4 query's candidates, then the depth-3 one's, run together
        ["Café mug", "Product 2", "Product 3", "Product 4", "Café mug", "Product 2", "Product 3"]
    )
    assert set(call[0]) == {"Product 4"}


def test_reranked_hits_stay_above_the_rest_and_the_scores_say_so(triton, reranking_select):
    # The cross-encoder dislikes both reranked candidates; they still lead the third.
    (response,) = reranking_select.execute(
        [rerank_request(triton, [[7, 8, 9]], [[3.0, 2.0, 1.0]], ["nothing"], depths=[2])]
    )
    out = triton.outputs(response)
    assert ids_of(triton, response) == [["sku-007", "sku-008", "sku-009"]]
    served = out[contract.SCORES][0]
    assert served[0] > served[1] > served[2] == pytest.approx(1.0)


def test_the_default_depth_applies_only_to_requests_with_a_query(triton, reranking_select):
    reranking_select.model.rerank_depth = 4  # as the rerank_depth parameter would set it
    rows, scores = [[1, 2, 3, 4, 5]], [[5.0, 4.0, 3.0, 2.0, 1.0]]
    with_query, unranked = reranking_select.execute(
        [
            rerank_request(triton, rows, scores, ["Product 4"]),
            request(triton, rows, scores, top_k=3),  # search_unranked sends no query
        ]
    )
    assert ids_of(triton, with_query)[0][0] == "sku-004"
    assert ids_of(triton, unranked) == [["sku-001", "sku-002", "sku-003"]]


def test_bad_rerank_requests_get_invalid_arg_and_their_neighbours_succeed(triton, reranking_select):
    rows, scores = [[1, 2, 3]], [[3.0, 2.0, 1.0]]
    no_query = triton.request(
        **{
            contract.CANDIDATE_ROWS: np.array(rows, dtype=np.int64),
            contract.CANDIDATE_SCORES: np.array(scores, dtype=np.float32),
            contract.RERANK_DEPTH: np.array([[2]], dtype=np.int32),
        }
    )
    too_deep = rerank_request(triton, rows, scores, ["x"], depths=[contract.MAX_RERANK_DEPTH + 1])
    negative = rerank_request(triton, rows, scores, ["x"], depths=[-1])
    good = rerank_request(triton, rows, scores, ["Product 3"], depths=[3])
    responses = reranking_select.execute([no_query, too_deep, negative, good])
    triton.assert_invalid_arg(responses[0], "query")
    triton.assert_invalid_arg(responses[1], "rerank_depth")
    triton.assert_invalid_arg(responses[2], "rerank_depth")
    assert ids_of(triton, responses[3])[0][0] == "sku-003"


def test_without_the_cross_encoder_the_search_is_served_as_ranked(triton, reranking_select):
    from ecomsearch.serving.rerank import RerankUnavailableError

    def unavailable(queries, titles):
        raise RerankUnavailableError("cross_encoder failed: not loaded")

    reranking_select.model.relevance = unavailable
    (response,) = reranking_select.execute(
        [rerank_request(triton, [[1, 2, 3]], [[3.0, 2.0, 1.0]], ["Product 3"], depths=[3])]
    )
    assert ids_of(triton, response) == [["sku-001", "sku-002", "sku-003"]]
    assert any(
        level == "WARNING" and "without the rerank" in message
        for level, message in triton.pb_utils.Logger.records
    )


def test_explanations_of_a_reranked_search_show_the_rerank_and_still_sum(
    triton, reranking_select, tree_ranker_file, repo
):
    import json

    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.ranking.explain import explained_total
    from ecomsearch.ranking.features import FEATURE_COUNT

    target = ModelRepositoryLayout(repo.select_dir.parent).ranker_tree_model
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(tree_ranker_file.read_bytes())
    model = initialize(triton, repo.select_dir)
    model.model.relevance = TitleMatcher()
    features = np.random.default_rng(2).normal(size=(1, 5, FEATURE_COUNT)).astype(np.float32)
    scores = tree_scores(tree_ranker_file, features)
    (response,) = model.execute(
        [
            rerank_request(
                triton, [[1, 2, 3, 4, 5]], scores, ["Product"], depths=[5], features=features
            )
        ]
    )
    out = triton.outputs(response)
    records = [json.loads(text) for text in out[contract.EXPLANATIONS][0]]
    for record, score in zip(records, out[contract.SCORES][0], strict=True):
        assert "rerank" in record and "personalisation" not in record
        assert explained_total(record) == pytest.approx(float(score), abs=1e-4)


def test_a_default_rerank_depth_beyond_the_contract_refuses_to_load(triton):
    from ecomsearch.live.labels import ProductLabels
    from ecomsearch.serving.select import SelectModel

    with pytest.raises(ValueError, match="rerank_depth"):
        SelectModel(triton.pb_utils, ProductLabels(), rerank_depth=contract.MAX_RERANK_DEPTH + 1)


def test_queries_left_without_a_product_count_as_empty_results(triton, select) -> None:
    from ecomsearch.serving.metrics import EMPTY_RESULTS

    (response,) = select.execute(
        [request(triton, [[3, 2, -1], [-1, -1, -1], [-1, -1, -1]], [[3, 2, 0]] * 3, top_k=2)]
    )

    assert not response.has_error()
    select.model.metrics.flush()  # what the sender thread does once a second
    series = triton.pb_utils.MetricFamily.registry[EMPTY_RESULTS.name].metrics
    ((labels, metric),) = series.items()
    assert dict(labels)["model"] == "select" and metric.value() == 2
