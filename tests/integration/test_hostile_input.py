"""Property-based hostile input, served for real: every model of the pipeline, not only `search`,
since any client that reaches the port can call any of them.

For each model, hypothesis generates requests and each is sent together with well-formed
neighbours (concurrently, so the dynamic batcher can put them in one batch):

- a request from the `bad` strategy is answered INVALID_ARGUMENT, with a message;
- a request from the `any` strategy (good or bad) is answered, or refused INVALID_ARGUMENT;
- never INTERNAL or another status, never a traceback or a server path in a message;
- the neighbours always get their answers, and the server stays ready.
"""

from __future__ import annotations

import concurrent.futures
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ecomsearch import contract
from ecomsearch.loadtest.chaos import WELL_FORMED, infer_raw

pytestmark = pytest.mark.integration

INVALID_ARGUMENT = "INVALID_ARGUMENT"
DIMENSION = 384
FEATURES = 17
NEIGHBOURS = 3
# A Python traceback or a file path of the server: nothing a client should ever read.
LEAK = re.compile(r"Traceback|File \"|\.py\b|/work/|/tmp/|/usr/|site-packages")
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Inputs = dict[str, np.ndarray]


def texts(*queries: bytes) -> np.ndarray:
    return np.array([[q] for q in queries], dtype=object)


def unit_vectors(rows: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(NEIGHBOURS + 1) as executor:
        yield executor


def send_with_neighbours(pool, url: str, model: str, inputs: Inputs) -> tuple[str, str]:
    """(status, message) of the request, sent with well-formed neighbours that must succeed."""
    futures = [pool.submit(infer_raw, url, model, WELL_FORMED[model]) for _ in range(NEIGHBOURS)]
    probe = pool.submit(infer_raw, url, model, inputs)
    for future in futures:
        neighbour = future.result()
        assert neighbour[0] == "OK", f"a well-formed neighbour failed: {neighbour}"
    status, message = probe.result()
    assert not LEAK.search(message), f"leaks server internals: {message}"
    return status, message


def assert_server_ready(url: str) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        assert client.is_server_ready()


# -- strategies: arrays a hostile client could send ------------------------------------------

# One word of 2,000 random letters: a typo-corrector that searched it (ecomsearch.spelling) would
# spend seconds and gigabytes on its deletion set.
LONG_WORD = bytes(np.random.default_rng(7).integers(ord("a"), ord("z") + 1, 2000, dtype=np.uint8))
hostile_text = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=48).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b"\x00" * 8,
            "\u200b\u200c\u200d".encode(),
            b"\xff\xfe",
            b"x" * 5000,
            b" \t\n",
            LONG_WORD,
        ]
    ),
)
special_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def queries(draw, min_rows: int = 1) -> np.ndarray:
    rows = draw(st.integers(min_rows, 4))
    return np.array([[draw(hostile_text)] for _ in range(rows)], dtype=object)


def float_arrays(shape) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, shape, elements=special_floats)


def with_a_non_finite(array: np.ndarray, position: int, value: float) -> np.ndarray:
    array = array.copy()
    array.flat[position % array.size] = value
    return array


@st.composite
def encoder_inputs(draw, bad: bool) -> Inputs:
    rows, length = draw(st.integers(1, 3)), draw(st.integers(1, 16))
    ids = draw(hnp.arrays(np.int64, (rows, length), elements=st.integers(0, 30_000)))
    mask = np.ones((rows, length), np.int64)
    if bad:
        kind = draw(st.sampled_from(["negative-id", "id-past-vocabulary", "mask", "too-long"]))
        if kind == "negative-id":
            ids[0, draw(st.integers(0, length - 1))] = draw(st.integers(-(2**62), -1))
        elif kind == "id-past-vocabulary":
            ids[0, 0] = draw(st.integers(10**6, 2**62))
        elif kind == "mask":
            mask[0, 0] = draw(st.sampled_from([-1, 2, 2**40]))
        else:
            length = contract.MAX_SEQUENCE_LENGTH + draw(st.integers(1, 200))
            ids, mask = np.ones((1, length), np.int64), np.ones((1, length), np.int64)
    return {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask}


@st.composite
def retrieve_inputs(draw, bad: bool) -> Inputs:
    rows = draw(st.integers(1, 3))
    embedding = unit_vectors(rows, seed=draw(st.integers(0, 1000)))
    query = np.array([[b"cable"]] * rows, dtype=object)
    if bad:
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        embedding = with_a_non_finite(embedding, draw(st.integers(0, 10**6)), value)
    else:
        embedding = draw(st.one_of(st.just(embedding), float_arrays((rows, DIMENSION))))
        query = draw(queries()) if draw(st.booleans()) else query
        if len(query) != rows:
            query = np.array([[b"cable"]] * rows, dtype=object)
    return {contract.QUERY: query, contract.EMBEDDING: embedding}


@st.composite
def ranker_inputs(draw, bad: bool) -> Inputs:
    rows, count = draw(st.integers(1, 2)), draw(st.sampled_from([1, 7, 400]))
    features = draw(
        hnp.arrays(
            np.float32,
            (rows, count, FEATURES),
            elements=st.floats(-1e3, 1e3, width=32),
        )
    )
    if bad:
        if draw(st.booleans()):
            value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            features = with_a_non_finite(features, draw(st.integers(0, 10**6)), value)
        else:
            features = np.zeros((1, contract.MAX_CANDIDATES + draw(st.integers(1, 50)), FEATURES))
            features = features.astype(np.float32)
    return {contract.CANDIDATE_FEATURES: features}


@st.composite
def select_inputs(draw, bad: bool) -> Inputs:
    rows, count = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    # Padding, or store keys of the fixture catalog's products (keys start at 1).
    valid_rows = st.one_of(st.just(-1), st.integers(1, 50))
    candidate_rows = draw(hnp.arrays(np.int64, (rows, count), elements=valid_rows))
    scores = draw(hnp.arrays(np.float32, (rows, count), elements=st.floats(-5, 5, width=32)))
    inputs = {contract.CANDIDATE_ROWS: candidate_rows, contract.CANDIDATE_SCORES: scores}
    if bad:
        kind = draw(st.sampled_from(["negative-row", "huge-row", "nan-score", "top-k", "user"]))
        if kind == "user":  # a personalised search's shopper: oversized, or not UTF-8
            user = draw(st.sampled_from([b"u" * (contract.MAX_USER_ID_BYTES + 1), b"\xc3\x28"]))
            inputs[contract.USER_ID] = np.full((rows, 1), user, dtype=object)
        elif kind == "negative-row":
            candidate_rows[0, 0] = draw(st.integers(-(2**62), -2))
        elif kind == "huge-row":
            candidate_rows[0, 0] = draw(st.integers(10**7, 2**62))
        elif kind == "nan-score":
            candidate_rows[0, 0] = 1
            scores[0, 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        else:
            top_k = draw(st.one_of(st.integers(-(2**31), 0), st.integers(101, 2**31 - 1)))
            inputs[contract.TOP_K] = np.full((rows, 1), top_k, np.int32)
    elif draw(st.booleans()):
        inputs[contract.TOP_K] = np.full((rows, 1), draw(st.integers(-5, 120)), np.int32)
    if not bad and draw(st.booleans()):
        inputs[contract.USER_ID] = np.full((rows, 1), draw(hostile_text), dtype=object)
    return inputs


@st.composite
def search_inputs(draw, bad: bool) -> Inputs:
    if bad:
        kind = draw(st.sampled_from(["blank", "invisible", "too-long", "utf8", "top-k"]))
        query = {
            "blank": b" \t ",
            "invisible": "\u200b\x00\ufeff".encode(),
            "too-long": b"y" * (contract.MAX_QUERY_BYTES + draw(st.integers(1, 10**4))),
            "utf8": b"mouse \xc3\x28",
            "top-k": b"mouse",
        }[kind]
        inputs = {contract.QUERY: texts(query)}
        if kind == "top-k":
            top_k = draw(st.one_of(st.integers(-(2**31), 0), st.integers(101, 2**31 - 1)))
            inputs[contract.TOP_K] = np.array([[top_k]], np.int32)
        return inputs
    query = draw(queries())
    inputs = {contract.QUERY: query}
    if draw(st.booleans()):
        inputs[contract.TOP_K] = np.full((len(query), 1), draw(st.integers(-3, 120)), np.int32)
    return inputs


@st.composite
def recommend_inputs(draw, bad: bool) -> Inputs:
    rows = draw(st.integers(1, 3))
    users = np.empty((rows, 1), dtype=object)
    users[:, 0] = [draw(hostile_text) if not bad else b"u" for _ in range(rows)]
    inputs = {contract.USER_ID: users}
    if bad:
        kind = draw(st.sampled_from(["long-user", "utf8", "recent", "top-k"]))
        if kind == "long-user":
            users[0, 0] = b"u" * (contract.MAX_USER_ID_BYTES + draw(st.integers(1, 5000)))
        elif kind == "utf8":
            users[0, 0] = b"shopper \xc3\x28"
        elif kind == "recent":
            width = contract.MAX_RECENT_PRODUCTS + draw(st.integers(1, 20))
            inputs[contract.RECENT_PRODUCT_IDS] = np.full((rows, width), b"x", dtype=object)
        else:
            top_k = draw(st.one_of(st.integers(-(2**31), 0), st.integers(101, 2**31 - 1)))
            inputs[contract.TOP_K] = np.full((rows, 1), top_k, np.int32)
        return inputs
    if draw(st.booleans()):
        width = draw(st.integers(1, 5))
        recent = np.empty((rows, width), dtype=object)
        for row in range(rows):
            recent[row, :] = [draw(hostile_text) for _ in range(width)]
        inputs[contract.RECENT_PRODUCT_IDS] = recent
    if draw(st.booleans()):
        inputs[contract.TOP_K] = np.full((rows, 1), draw(st.integers(-3, 120)), np.int32)
    return inputs


@st.composite
def similar_inputs(draw, bad: bool) -> Inputs:
    if bad:  # unknown products, oversized ids, invalid UTF-8
        product = draw(
            st.sampled_from([b"no-such-product", b"x" * 5000, b"case-fan \xc3\x28", b""])
        )
        return {contract.PRODUCT_ID: texts(product)}
    inputs = {contract.PRODUCT_ID: texts(draw(st.one_of(hostile_text, st.just(b"cpu-00000"))))}
    if draw(st.booleans()):
        inputs[contract.TOP_K] = np.array([[draw(st.integers(-3, 120))]], np.int32)
    return inputs


@st.composite
def events_inputs(draw, bad: bool) -> Inputs:
    n = draw(st.integers(1, 4))

    def column(values) -> np.ndarray:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    users = [draw(hostile_text) if not bad else b"shopper-2" for _ in range(n)]
    products = [draw(st.sampled_from([b"case-fan-00000", b"cpu-00000", b"nope"])) for _ in range(n)]
    kinds = [draw(st.sampled_from([b"view", b"cart", b"purchase", b"like"])) for _ in range(n)]
    inputs = {
        contract.EVENT_USER_IDS: column(users),
        contract.EVENT_PRODUCT_IDS: column(products),
        contract.EVENT_KINDS_INPUT: column(kinds),
    }
    if not bad:
        if draw(st.booleans()):
            quantities = draw(hnp.arrays(np.int32, (n,), elements=st.integers(-3, 10**7)))
            inputs[contract.EVENT_QUANTITIES] = quantities
        if draw(st.booleans()):
            inputs[contract.EVENT_TIMESTAMPS] = draw(
                hnp.arrays(np.float64, (n,), elements=st.floats(allow_nan=True))
            )
        return inputs
    inputs[contract.EVENT_PRODUCT_IDS] = column([b"case-fan-00000"] * n)
    inputs[contract.EVENT_KINDS_INPUT] = column([b"view"] * n)
    kind = draw(st.sampled_from(["product", "kind", "quantity", "time", "lengths"]))
    if kind == "product":
        inputs[contract.EVENT_PRODUCT_IDS][0] = b"no-such-product"
    elif kind == "kind":
        inputs[contract.EVENT_KINDS_INPUT][0] = b"like"
    elif kind == "quantity":
        inputs[contract.EVENT_QUANTITIES] = np.full(n, draw(st.integers(-(2**31), 0)), np.int32)
    elif kind == "time":
        value = draw(st.sampled_from([np.nan, np.inf, -1.0]))
        inputs[contract.EVENT_TIMESTAMPS] = np.full(n, value, np.float64)
    else:
        inputs[contract.EVENT_USER_IDS] = column([*users, b"extra"])
    return inputs


STRATEGIES = {
    contract.SEARCH_MODEL: search_inputs,
    contract.PREPROCESS_MODEL: lambda bad: (
        search_inputs(bad).map(lambda i: {contract.QUERY: i[contract.QUERY]})
        if not bad
        else st.sampled_from([b"", b"\x00\x00", "\u200b".encode(), b"\xff", b"z" * 3000]).map(
            lambda q: {contract.QUERY: texts(q)}
        )
    ),
    contract.ENCODER_MODEL: encoder_inputs,
    contract.RETRIEVE_MODEL: retrieve_inputs,
    contract.RANKER_MODEL: ranker_inputs,
    contract.SELECT_MODEL: select_inputs,
    contract.RECOMMEND_MODEL: recommend_inputs,
    contract.RECOMMEND_CANDIDATES_MODEL: recommend_inputs,
    contract.SIMILAR_MODEL: similar_inputs,
    contract.SIMILAR_CANDIDATES_MODEL: similar_inputs,
    contract.EVENTS_MODEL: events_inputs,
}


@pytest.mark.parametrize("model", sorted(STRATEGIES))
def test_bad_requests_get_invalid_argument_and_neighbours_are_served(grpc_url, pool, model):
    @SETTINGS
    @given(inputs=STRATEGIES[model](True))
    def check(inputs: Inputs) -> None:
        status, message = send_with_neighbours(pool, grpc_url, model, inputs)
        assert status == INVALID_ARGUMENT and message, (status, message)

    check()
    assert_server_ready(grpc_url)


@pytest.mark.parametrize("model", sorted(STRATEGIES))
def test_any_request_is_answered_or_refused_as_invalid_never_an_internal_error(
    grpc_url, pool, model
):
    @SETTINGS
    @given(inputs=STRATEGIES[model](False))
    def check(inputs: Inputs) -> None:
        status, message = send_with_neighbours(pool, grpc_url, model, inputs)
        assert status in ("OK", INVALID_ARGUMENT), (status, message)

    check()
    assert_server_ready(grpc_url)
