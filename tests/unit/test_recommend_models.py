"""The candidate models of `recommend` and `similar` (ecomsearch.serving.recommend) through the
fake backend module, over a real SQLite store holding the tests/data/online_retail sample's
products and purchases, and an index built from that store (so the index's keys are the store's
and the event log's).

Each answer is checked against `Recommender` called directly on the same state (a batch must
answer every request as if it came alone), and against the request's own filters."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.index.builder import store_snapshot, write_index
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.filters import NO_FILTER, SearchFilter
from ecomsearch.ranking.candidates import HybridRetriever
from ecomsearch.recommend.candidates import (
    FEATURE_COUNT,
    FEATURE_NAMES,
    POPULAR_CANDIDATES,
    Recommender,
)
from ecomsearch.recommend.interactions import Interactions
from ecomsearch.recommend.transactions import read_purchases
from ecomsearch.serving.events import EventsModel
from ecomsearch.serving.recommend import (
    EventCatchUp,
    LiveRecommender,
    RecommendCandidatesModel,
    SimilarCandidatesModel,
    check_recommender_features,
)
from ecomsearch.store import Event, ProductWrite, open_store
from tests.project import MODEL_REPOSITORY

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "online_retail"
DIMENSION = 16
ENCODER = "e" * 64
BRANDS = ("Acme", "Bosch", "Makita")
COPURCHASE_WEIGHT = 1.0


@dataclass(frozen=True)
class Sample:
    """The store file (closed: each test works on its own copy) and the index built from it."""

    store_path: Path
    index_dir: Path
    key_of: dict[str, int]
    id_of: dict[int, str]
    brand_of: dict[int, str]
    price_of: dict[int, float]
    buyers: list[str]  # customers of the sample, most purchases first


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    directory = tmp_path_factory.mktemp("recommend_models")
    store_path = directory / "catalog.sqlite3"
    records = [json.loads(line) for line in (SAMPLE_DIR / "catalog_sample.jsonl").open()]
    writes = [
        ProductWrite(id=r["id"], title=r["title"], brand=BRANDS[i % 3], price=r["price"])
        for i, r in enumerate(records)
    ]
    vectors = np.random.default_rng(3).normal(size=(len(writes), DIMENSION))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    purchases = read_purchases(SAMPLE_DIR / "transactions_sample.csv")
    with open_store(f"sqlite://{store_path}") as store:
        # Keys that are not 0..n-1: a batch of placeholder products first, then deleted.
        store.upsert(
            [ProductWrite(id=f"old-{i}", title="Old") for i in range(17)],
            np.ones((17, DIMENSION), np.float32) / 4,
            ENCODER,
        )
        store.delete([f"old-{i}" for i in range(17)])
        result = store.upsert(writes, vectors, ENCODER)
        store.record_events(
            [
                Event(user_id=c, product_id=p, kind="purchase", timestamp_s=t, quantity=int(q))
                for c, p, t, q in zip(
                    purchases.customers,
                    purchases.products,
                    purchases.timestamps_s.tolist(),
                    purchases.quantities.tolist(),
                    strict=True,
                )
            ]
        )
        write_index(directory / "index", store_snapshot(store, "catalog"))
    keys = list(result.keys)
    assert min(keys) >= 17
    counts: dict[str, int] = {}
    for customer in purchases.customers:
        counts[customer] = counts.get(customer, 0) + 1
    return Sample(
        store_path=store_path,
        index_dir=directory / "index",
        key_of={w.id: k for w, k in zip(writes, keys, strict=True)},
        id_of={k: w.id for w, k in zip(writes, keys, strict=True)},
        brand_of={k: w.brand for w, k in zip(writes, keys, strict=True)},
        price_of={k: w.price for w, k in zip(writes, keys, strict=True)},
        buyers=sorted(counts, key=lambda c: (-counts[c], c)),
    )


@pytest.fixture(scope="module")
def base_index(sample: Sample) -> CatalogIndex:
    return CatalogIndex.load(sample.index_dir, encoder_fingerprint=ENCODER)


@pytest.fixture
def store_url(sample: Sample, tmp_path: Path) -> str:
    """A copy of the sample's store for this test alone (tests record events in it)."""
    path = tmp_path / "catalog.sqlite3"
    shutil.copy(sample.store_path, path)
    return f"sqlite://{path}"


@pytest.fixture
def live(base_index: CatalogIndex, store_url: str) -> Iterator[LiveRecommender]:
    """A LiveRecommender over the index and the store's event log, caught up on each batch."""
    interactions = Interactions()
    catch_up = EventCatchUp(store_url, interactions)
    retriever = HybridRetriever(LiveCatalog.load(base_index))
    yield LiveRecommender(retriever, interactions, threading.Lock(), events=catch_up)
    catch_up.store().close()


@pytest.fixture
def recommend(pb_utils, live) -> RecommendCandidatesModel:
    return RecommendCandidatesModel(pb_utils, live)


@pytest.fixture
def similar(pb_utils, live) -> SimilarCandidatesModel:
    return SimilarCandidatesModel(pb_utils, live, COPURCHASE_WEIGHT)


def column(values: list[str | bytes] | list[list[str | bytes]]) -> np.ndarray:
    """A BYTES input, [batch, 1] from a list, [batch, r] from a list of lists."""
    rows = [row if isinstance(row, list) else [row] for row in values]
    array = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        array[i, :] = [v if isinstance(v, bytes) else v.encode() for v in row]
    return array


def top_k(k: int, batch: int) -> np.ndarray:
    return np.full((batch, 1), k, dtype=np.int32)


def reference(live: LiveRecommender) -> Recommender:
    """The recommender on the state the model served from (call after an execute)."""
    return Recommender(live.interactions, live.retriever.catalog)


def feature(features: np.ndarray, name: str) -> np.ndarray:
    return features[..., FEATURE_NAMES.index(name)]


def answered(triton, response, scores_name: str) -> tuple[np.ndarray, np.ndarray]:
    out = triton.outputs(response)
    assert set(out) == {contract.CANDIDATE_ROWS, scores_name}
    rows, scores = out[contract.CANDIDATE_ROWS], out[scores_name]
    assert rows.dtype == np.int64 and rows.ndim == 2
    assert scores.dtype == np.float32 and scores.shape[:2] == rows.shape
    return rows, scores


def assert_row(rows: np.ndarray, features: np.ndarray, expected) -> None:
    """One query's answer is the reference's candidates, then -1 and all-zero features."""
    n = len(expected.keys)
    assert rows[:n].tolist() == expected.keys.tolist()
    assert (rows[n:] == -1).all()
    np.testing.assert_allclose(features[:n], expected.features, rtol=1e-6, atol=1e-6)
    assert not features[n:].any()


# --- recommend ------------------------------------------------------------------------------------


def test_a_batch_is_answered_query_by_query_padded_to_the_widest(triton, recommend, live, sample):
    buyer = sample.buyers[0]
    requests = [
        triton.request(user_id=column(["nobody"]), top_k=top_k(80, 1)),
        triton.request(user_id=column([buyer, "nobody", "nobody"]), top_k=top_k(10, 3)),
        triton.request(user_id=column([buyer])),  # default k
    ]

    responses = recommend.execute(requests)

    answers = [answered(triton, r, contract.CANDIDATE_FEATURES) for r in responses]
    recommender = reference(live)
    expected = [
        [recommender.recommend("nobody", top_k=80)],
        [recommender.recommend(u, top_k=10) for u in (buyer, "nobody", "nobody")],
        [recommender.recommend(buyer, top_k=contract.DEFAULT_TOP_K)],
    ]
    assert len(expected[0][0].keys) == 80 and len(expected[1][1].keys) == POPULAR_CANDIDATES
    assert len(expected[1][0].keys) > POPULAR_CANDIDATES, "the buyer's own products come first"
    width = max(len(e.keys) for queries in expected for e in queries)
    for (rows, features), queries in zip(answers, expected, strict=True):
        assert rows.shape == (len(queries), width)
        assert features.shape == (len(queries), width, FEATURE_COUNT)
        for i, query in enumerate(queries):
            assert_row(rows[i], features[i], query)
    # The buyer's candidates say what the buyer bought; nobody's do not.
    rows, features = answers[1]
    assert feature(features[0], "user_bought_before").any()
    assert not feature(features[1], "user_bought_before").any()
    assert live.interactions.applied_seq == len(live.events.store().events(0))


def test_an_unknown_or_empty_user_gets_the_popular_products(triton, recommend, live):
    (response,) = recommend.execute([triton.request(user_id=column(["stranger", ""]))])

    rows, features = answered(triton, response, contract.CANDIDATE_FEATURES)
    recommender = reference(live)
    popular = recommender.popular(POPULAR_CANDIDATES, None).tolist()
    assert rows.shape == (2, POPULAR_CANDIDATES)
    assert rows[0].tolist() == rows[1].tolist() == popular
    assert (
        live.interactions.basket_counts[popular[0]] > live.interactions.basket_counts[popular[-1]]
    )
    assert not feature(features, "user_bought_before").any()
    assert feature(features, "popularity_total_log").min() >= 0
    assert feature(features, "popularity_total_log")[0, 0] > 0


def test_each_request_gets_its_own_filters(triton, recommend, live, sample):
    buyer = sample.buyers[1]
    prices = sorted(set(sample.price_of.values()))
    cheap = (prices[20] + prices[21]) / 2
    requests = [
        triton.request(
            user_id=column([buyer, "nobody"]),
            top_k=top_k(20, 2),
            brand=column(["acme", "acme"]),
        ),
        triton.request(
            user_id=column([buyer]),
            top_k=top_k(5, 1),
            max_price=np.full((1, 1), cheap, dtype=np.float32),
        ),
        triton.request(user_id=column(["nobody"]), top_k=top_k(60, 1)),
        triton.request(user_id=column(["nobody"]), brand=column(["Nobody's brand"])),
    ]

    responses = recommend.execute(requests)

    recommender = reference(live)
    acme = SearchFilter.parse(brand="acme")
    cheap_filter = SearchFilter.parse(max_price=float(np.float32(cheap)))
    expected = [
        (
            [
                recommender.recommend(buyer, (), acme, 20),
                recommender.recommend("nobody", (), acme, 20),
            ],
            lambda key: sample.brand_of[key] == "Acme",
        ),
        (
            [recommender.recommend(buyer, (), cheap_filter, 5)],
            lambda key: sample.price_of[key] <= np.float32(cheap),
        ),
        ([recommender.recommend("nobody", (), NO_FILTER, 60)], lambda key: True),
        (
            [recommender.recommend("nobody", (), SearchFilter.parse(brand="Nobody's brand"))],
            lambda key: False,
        ),
    ]
    for response, (queries, passes) in zip(responses, expected, strict=True):
        rows, features = answered(triton, response, contract.CANDIDATE_FEATURES)
        for i, query in enumerate(queries):
            assert_row(rows[i], features[i], query)
            keys = [k for k in rows[i].tolist() if k >= 0]
            assert all(passes(k) for k in keys)
    acme_rows = answered(triton, responses[0], contract.CANDIDATE_FEATURES)[0]
    acme = sum(b == "Acme" for b in sample.brand_of.values())
    assert acme > POPULAR_CANDIDATES and (acme_rows[1] >= 0).sum() == POPULAR_CANDIDATES
    cheap_rows = answered(triton, responses[1], contract.CANDIDATE_FEATURES)[0]
    assert (cheap_rows >= 0).sum() >= 5
    nothing = answered(triton, responses[3], contract.CANDIDATE_FEATURES)[0]
    assert (nothing == -1).all()


def test_each_query_of_a_request_gets_its_own_filters(triton, recommend, live, sample):
    """Empty strings and NaN bounds are "no filter" for a query whose neighbours filter."""
    prices = sorted(set(sample.price_of.values()))
    cheap = float(np.float32((prices[10] + prices[11]) / 2))
    (response,) = recommend.execute(
        [
            triton.request(
                user_id=column(["nobody", sample.buyers[0]]),
                top_k=top_k(20, 2),
                brand=column(["Bosch", ""]),
                max_price=np.array([[np.nan], [cheap]], dtype=np.float32),
            )
        ]
    )

    rows, features = answered(triton, response, contract.CANDIDATE_FEATURES)
    recommender = reference(live)
    bosch = recommender.recommend("nobody", (), SearchFilter.parse(brand="Bosch"), 20)
    cheap_ones = recommender.recommend(
        sample.buyers[0], (), SearchFilter.parse(max_price=cheap), 20
    )
    assert_row(rows[0], features[0], bosch)
    assert_row(rows[1], features[1], cheap_ones)
    assert all(sample.brand_of[k] == "Bosch" for k in rows[0].tolist() if k >= 0)
    assert all(sample.price_of[k] <= cheap for k in rows[1].tolist() if k >= 0)
    assert any(sample.brand_of[k] != "Bosch" for k in rows[1].tolist() if k >= 0)


def test_a_filter_no_product_passes_answers_one_padding_slot(triton, recommend):
    (response,) = recommend.execute(
        [triton.request(user_id=column(["nobody"]), brand=column(["Nobody's brand"]))]
    )
    rows, features = answered(triton, response, contract.CANDIDATE_FEATURES)
    assert rows.tolist() == [[-1]]
    assert features.shape == (1, 1, FEATURE_COUNT) and not features.any()


def test_recent_products_seed_the_candidates_and_unknown_ones_are_ignored(
    triton, recommend, live, sample
):
    seeds = [sample.id_of[k] for k in sorted(sample.id_of)[:2]]
    requests = [
        triton.request(
            user_id=column(["nobody"]), recent_product_ids=column([[*seeds, "", "no-such"]])
        ),
        triton.request(user_id=column(["nobody"]), recent_product_ids=column([[*seeds, "", ""]])),
        triton.request(user_id=column(["nobody"])),
    ]

    with_unknown, without, plain = (
        answered(triton, r, contract.CANDIDATE_FEATURES) for r in recommend.execute(requests)
    )

    seed_keys = [sample.key_of[s] for s in seeds]
    expected = reference(live).recommend("nobody", seed_keys)
    assert_row(with_unknown[0][0], with_unknown[1][0], expected)
    assert_row(without[0][0], without[1][0], expected)
    rows, features = with_unknown[0][0], with_unknown[1][0]
    assert feature(features, "embedding_max").max() > 0
    seen = feature(features, "recently_seen")
    marked = {k for k, s in zip(rows.tolist(), seen.tolist(), strict=True) if s}
    assert marked and marked == set(seed_keys) & set(rows.tolist())
    assert not feature(plain[1], "embedding_max").any()


def test_events_recorded_after_the_model_was_built_shape_the_next_answer(
    pb_utils, triton, recommend, live, sample, store_url
):
    def candidates():
        (response,) = recommend.execute([triton.request(user_id=column(["newbie"]))])
        rows, features = answered(triton, response, contract.CANDIDATE_FEATURES)
        return rows[0], features[0]

    rows, features = candidates()
    popular = set(rows.tolist())
    unpopular = next(k for k in sorted(sample.id_of, reverse=True) if k not in popular)
    assert not feature(features, "user_bought_before").any()
    before = live.interactions.applied_seq

    with open_store(store_url) as store:
        writer = EventsModel(pb_utils, store, clock=lambda: live.interactions.clock_s + 60)
        (response,) = writer.execute(
            [
                triton.request(
                    user_ids=np.array([b"newbie"], dtype=object),
                    product_ids=np.array([sample.id_of[unpopular].encode()], dtype=object),
                    kinds=np.array([b"purchase"], dtype=object),
                )
            ]
        )
        assert int(triton.outputs(response)[contract.SEQUENCE_NUMBER][0]) == before + 1

    rows, features = candidates()

    assert live.interactions.applied_seq == before + 1
    assert rows[0] == unpopular, "the shopper's own purchase first"
    bought = feature(features, "user_bought_before")
    assert bought[0] == 1 and not bought[1:].any()
    assert feature(features, "recently_seen")[0] == 1
    assert_row(rows, features, reference(live).recommend("newbie"))


BAD_RECOMMEND = [
    pytest.param({}, [f"{contract.USER_ID!r} is required"], id="no-user"),
    pytest.param(
        {contract.USER_ID: np.array([b"u1", b"u2"], dtype=object)},
        ["shape [batch, 1]"],
        id="user-1d",
    ),
    pytest.param({contract.USER_ID: column([b"\xff"])}, ["must be UTF-8"], id="user-not-utf8"),
    pytest.param(
        {contract.USER_ID: column(["u" * (contract.MAX_USER_ID_BYTES + 1)])},
        [f"longer than {contract.MAX_USER_ID_BYTES} bytes"],
        id="user-too-long",
    ),
    pytest.param(
        {
            contract.USER_ID: column(["u1"]),
            contract.RECENT_PRODUCT_IDS: column([["x"] * (contract.MAX_RECENT_PRODUCTS + 1)]),
        },
        [f"at most {contract.MAX_RECENT_PRODUCTS} recent products"],
        id="too-many-recent",
    ),
    pytest.param(
        {contract.USER_ID: column(["u1"]), contract.RECENT_PRODUCT_IDS: column([[b"\xc3"]])},
        [f"{contract.RECENT_PRODUCT_IDS!r} must be UTF-8"],
        id="recent-not-utf8",
    ),
    pytest.param(
        {contract.USER_ID: column(["u1"]), contract.RECENT_PRODUCT_IDS: column([["a"], ["b"]])},
        [f"{contract.RECENT_PRODUCT_IDS!r} must have shape [1, r]"],
        id="recent-rows",
    ),
    pytest.param(
        {contract.USER_ID: column(["u1"]), contract.TOP_K: top_k(0, 1)},
        ["between 1 and"],
        id="k-0",
    ),
    pytest.param(
        {contract.USER_ID: column(["u1"]), contract.TOP_K: top_k(contract.MAX_TOP_K + 1, 1)},
        ["between 1 and"],
        id="k-too-big",
    ),
    pytest.param(
        {contract.USER_ID: column(["u1"]), contract.FILTER_BRAND: column([b"\xff"])},
        ["must be UTF-8"],
        id="brand-not-utf8",
    ),
]


@pytest.mark.parametrize(("tensors", "fragments"), BAD_RECOMMEND)
def test_a_bad_recommend_request_is_invalid_and_its_neighbour_is_answered(
    triton, recommend, live, tensors, fragments
):
    bad, good = recommend.execute(
        [triton.request(**tensors), triton.request(user_id=column(["nobody"]))]
    )
    message = triton.assert_invalid_arg(bad, *fragments)
    assert "Traceback" not in message
    rows, features = answered(triton, good, contract.CANDIDATE_FEATURES)
    assert_row(rows[0], features[0], reference(live).recommend("nobody"))


# --- similar ---------------------------------------------------------------------------------


def test_similar_answers_each_anchor_without_itself_best_first(triton, similar, live, sample):
    anchors = sorted(sample.id_of)[::40]
    requests = [
        triton.request(
            product_id=column([sample.id_of[k] for k in anchors]), top_k=top_k(5, len(anchors))
        ),
        triton.request(product_id=column([sample.id_of[anchors[0]]])),
    ]

    responses = similar.execute(requests)

    recommender = reference(live)
    answers = [answered(triton, r, contract.CANDIDATE_SCORES) for r in responses]
    expected = [recommender.similar(k, NO_FILTER, COPURCHASE_WEIGHT) for k in anchors]
    width = max(len(keys) for keys, _ in expected)
    assert answers[0][0].shape == (len(anchors), width)
    assert answers[1][0].shape == (1, width)
    for (rows, scores), queries in (
        (answers[0], list(zip(anchors, expected, strict=True))),
        (answers[1], [(anchors[0], expected[0])]),
    ):
        for i, (anchor, (keys, blended)) in enumerate(queries):
            n = len(keys)
            assert n > 0 and rows[i, :n].tolist() == keys.tolist()
            np.testing.assert_allclose(scores[i, :n], blended, rtol=1e-6, atol=1e-6)
            assert anchor not in rows[i].tolist()
            assert np.all(np.diff(scores[i, :n]) <= 0)
            assert (rows[i, n:] == -1).all() and np.isneginf(scores[i, n:]).all()
    # Co-purchases count: some anchor's order is not the plain embedding order.
    assert any(
        recommender.similar(k, NO_FILTER, 0.0)[0].tolist() != keys.tolist()
        for k, (keys, _) in zip(anchors, expected, strict=True)
    )


def test_similar_obeys_each_requests_filters(triton, similar, live, sample):
    anchor = sample.id_of[sorted(sample.id_of)[7]]
    prices = sorted(set(sample.price_of.values()))
    bound = float(np.float32((prices[30] + prices[31]) / 2))
    bosch, cheap, plain = (
        answered(triton, r, contract.CANDIDATE_SCORES)[0][0]
        for r in similar.execute(
            [
                triton.request(product_id=column([anchor]), brand=column(["BOSCH"])),
                triton.request(
                    product_id=column([anchor]),
                    max_price=np.full((1, 1), bound, dtype=np.float32),
                ),
                triton.request(product_id=column([anchor])),
            ]
        )
    )
    for rows, passes in (
        (bosch, lambda k: sample.brand_of[k] == "Bosch"),
        (cheap, lambda k: sample.price_of[k] <= bound),
    ):
        keys = [k for k in rows.tolist() if k >= 0]
        assert keys and all(passes(k) for k in keys)
        assert sample.key_of[anchor] not in keys
    bosch_keys = {k for k in bosch.tolist() if k >= 0}
    assert bosch_keys == {
        k for k, b in sample.brand_of.items() if b == "Bosch" and k != sample.key_of[anchor]
    }
    assert not all(sample.brand_of[k] == "Bosch" for k in plain.tolist() if k >= 0)


@pytest.mark.parametrize(
    ("product_id", "fragments"),
    [
        pytest.param("no-such-product", ["no live product 'no-such-product'"], id="unknown"),
        pytest.param(b"\xff", [f"{contract.PRODUCT_ID!r} must be UTF-8"], id="not-utf8"),
        pytest.param(
            "p" * (contract.MAX_PRODUCT_ID_BYTES + 1),
            [f"longer than {contract.MAX_PRODUCT_ID_BYTES} bytes"],
            id="too-long",
        ),
    ],
)
def test_a_bad_product_fails_its_request_and_its_neighbour_is_answered(
    triton, similar, live, sample, product_id, fragments
):
    known = sorted(sample.id_of)[3]
    bad, good = similar.execute(
        [
            triton.request(product_id=column([product_id])),
            triton.request(product_id=column([sample.id_of[known]])),
        ]
    )
    triton.assert_invalid_arg(bad, *fragments)
    rows, scores = answered(triton, good, contract.CANDIDATE_SCORES)
    keys, blended = reference(live).similar(known, NO_FILTER, COPURCHASE_WEIGHT)
    assert rows[0, : len(keys)].tolist() == keys.tolist()
    np.testing.assert_allclose(scores[0, : len(keys)], blended, rtol=1e-6, atol=1e-6)


def test_similar_refuses_a_request_without_a_product(triton, similar):
    (response,) = similar.execute([triton.request(top_k=top_k(5, 1))])
    triton.assert_invalid_arg(response, f"{contract.PRODUCT_ID!r} is required")


def test_one_unknown_product_in_a_request_fails_that_request_only(triton, similar, sample):
    known = [sample.id_of[k] for k in sorted(sample.id_of)[:2]]
    bad, good = similar.execute(
        [
            triton.request(product_id=column([known[0], "no-such-product"])),
            triton.request(product_id=column([known[1]])),
        ]
    )
    triton.assert_invalid_arg(bad, "'no-such-product'")
    assert sample.key_of[known[1]] not in answered(triton, good, contract.CANDIDATE_SCORES)[0]


# --- the ranker's record -----------------------------------------------------------------------


def test_the_checked_in_recommender_record_has_the_served_features():
    path = MODEL_REPOSITORY / contract.RECOMMEND_RANKER_MODEL / "1" / "recommender.json"
    record = check_recommender_features(path)
    assert record["feature_names"] == list(FEATURE_NAMES)


def test_a_missing_recommender_record_is_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train-recommender"):
        check_recommender_features(tmp_path / "recommender.json")


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(list(FEATURE_NAMES)[:-1], id="one-fewer"),
        pytest.param(list(reversed(FEATURE_NAMES)), id="other-order"),
        pytest.param([*FEATURE_NAMES, "new_feature"], id="one-more"),
        pytest.param(None, id="none-recorded"),
    ],
)
def test_a_recommender_trained_on_other_features_is_refused(tmp_path: Path, names: Any):
    path = tmp_path / "recommender.json"
    path.write_text(json.dumps({} if names is None else {"feature_names": names}))
    with pytest.raises(RuntimeError, match="train it again"):
        check_recommender_features(path)
