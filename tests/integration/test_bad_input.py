"""Malformed requests get INVALID_ARG, the server stays ready, and neighbours still succeed."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ecomsearch import contract

pytestmark = pytest.mark.integration

INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"


@pytest.fixture
def raw(grpc_url):
    with grpcclient.InferenceServerClient(grpc_url) as client:
        yield client


def query_input(values, datatype="BYTES", shape=None) -> grpcclient.InferInput:
    dtype = object if datatype == "BYTES" else np.dtype(datatype.lower().replace("fp", "float"))
    array = np.array(values, dtype=dtype)
    tensor = grpcclient.InferInput(contract.QUERY, list(shape or array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def top_k_input(values) -> grpcclient.InferInput:
    array = np.array(values, dtype=np.int32)
    tensor = grpcclient.InferInput(contract.TOP_K, list(array.shape), "INT32")
    tensor.set_data_from_numpy(array)
    return tensor


def search(raw, inputs):
    return raw.infer(contract.SEARCH_MODEL, inputs, client_timeout=30)


def assert_invalid(raw, inputs, message_part: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        search(raw, inputs)
    assert caught.value.status() == INVALID_ARGUMENT, caught.value
    assert message_part in caught.value.message(), caught.value.message()
    assert raw.is_server_ready() and raw.is_model_ready(contract.SEARCH_MODEL)


@pytest.mark.parametrize(
    ("query", "message_part"),
    [
        (b"", "empty"),
        (b"   \t ", "empty"),
        (b"x" * (1 << 20), "bytes"),
        (b"gaming \xff\xfe mouse", "UTF-8"),
    ],
    ids=["empty", "whitespace", "1MB", "invalid-utf8"],
)
def test_bad_query_text(raw, query, message_part):
    assert_invalid(raw, [query_input([[query]])], message_part)


@pytest.mark.parametrize("top_k", [0, -3, contract.MAX_TOP_K + 1])
def test_top_k_out_of_range(raw, top_k):
    assert_invalid(raw, [query_input([[b"mouse"]]), top_k_input([[top_k]])], "top_k")


def test_top_k_at_maximum_succeeds(raw):
    result = search(raw, [query_input([[b"mouse"]]), top_k_input([[contract.MAX_TOP_K]])])
    assert result.as_numpy(contract.PRODUCT_IDS).shape == (1, contract.MAX_TOP_K)


def test_wrong_dtype(raw):
    assert_invalid(raw, [query_input([[1.5]], datatype="FP32")], "data-type")


def test_wrong_shape(raw):
    assert_invalid(raw, [query_input([[b"mouse", b"keyboard"]])], "shape")


def test_batch_above_maximum_rejected_at_maximum_accepted(raw):
    limit = contract.MAX_QUERIES_PER_REQUEST
    assert_invalid(raw, [query_input([[b"mouse"]] * (limit + 1))], "batch")
    result = search(raw, [query_input([[b"mouse"]] * limit)])
    assert result.as_numpy(contract.PRODUCT_IDS).shape == (limit, contract.DEFAULT_TOP_K)


def test_explain_must_be_a_bool_per_query(raw):
    query = query_input([[b"mouse"], [b"keyboard"]])
    wrong_type = grpcclient.InferInput(contract.EXPLAIN, [2, 1], "INT32")
    wrong_type.set_data_from_numpy(np.ones((2, 1), dtype=np.int32))
    assert_invalid(raw, [query, wrong_type], "explain")
    one_for_two = grpcclient.InferInput(contract.EXPLAIN, [1, 1], "BOOL")
    one_for_two.set_data_from_numpy(np.ones((1, 1), dtype=bool))
    with pytest.raises(InferenceServerException) as caught:
        search(raw, [query, one_for_two])
    assert caught.value.status() == INVALID_ARGUMENT
    assert raw.is_server_ready()


def test_good_requests_beside_bad_ones_succeed(grpc_url):
    """Sent together so the dynamic batchers merge them: only the bad ones fail."""
    bad = {1: b"", 4: b"\xff\xfe", 6: b"x" * 5000}
    queries = {n: bad.get(n, f"gaming mouse {n}".encode()) for n in range(8)}

    def call(n):
        with grpcclient.InferenceServerClient(grpc_url) as client:
            try:
                result = client.infer(contract.SEARCH_MODEL, [query_input([[queries[n]]])])
                return result.as_numpy(contract.PRODUCT_IDS).shape
            except InferenceServerException as e:
                return e.status()

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            outcomes = dict(zip(queries, pool.map(call, queries), strict=True))
        for n, outcome in outcomes.items():
            expected = INVALID_ARGUMENT if n in bad else (1, contract.DEFAULT_TOP_K)
            assert outcome == expected, (n, outcome)
