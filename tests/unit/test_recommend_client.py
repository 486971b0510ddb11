"""The client's side of `recommend`, `similar` and `events`: the tensors it builds (names,
shapes, dtypes and values, per ecomsearch.contract), what it refuses before sending, and the
calls SearchClient and AsyncSearchClient make, against a fake server."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from ecomsearch import contract
from ecomsearch.client import (
    AsyncSearchClient,
    BadRequestError,
    EventsAck,
    Filters,
    Hit,
    SearchClient,
    ShopperEvent,
    protocol,
)
from ecomsearch.client.protocol import (
    build_event_inputs,
    build_recommend_inputs,
    build_similar_inputs,
    parse_events_ack,
)

_DTYPES = {"BYTES": None, "FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "BOOL": bool}


def sent(infer_input) -> np.ndarray:
    """What an InferInput carries, as numpy (BYTES as an object array of bytes)."""
    raw = infer_input._get_content()
    dtype = _DTYPES[infer_input.datatype()]
    values = deserialize_bytes_tensor(raw) if dtype is None else np.frombuffer(raw, dtype)
    return values.reshape(infer_input.shape())


def tensors(inputs: list) -> dict[str, tuple[list[int], str, np.ndarray]]:
    """name -> (shape, datatype, values); fails on a name sent twice."""
    out = {i.name(): (list(i.shape()), i.datatype(), sent(i)) for i in inputs}
    assert len(out) == len(inputs), [i.name() for i in inputs]
    return out


# --- recommend -----------------------------------------------------------------------------------


def test_recommend_inputs_are_one_query_of_user_and_k():
    sent_tensors = tensors(build_recommend_inputs(grpcclient, "user-17", 7))

    assert set(sent_tensors) == {contract.USER_ID, contract.TOP_K}
    shape, datatype, value = sent_tensors[contract.USER_ID]
    assert (shape, datatype, value.tolist()) == ([1, 1], "BYTES", [[b"user-17"]])
    shape, datatype, value = sent_tensors[contract.TOP_K]
    assert (shape, datatype, value.tolist()) == ([1, 1], "INT32", [[7]])


def test_recommend_inputs_with_recent_products_and_filters():
    sent_tensors = tensors(
        build_recommend_inputs(
            grpcclient,
            "Zoë",
            contract.MAX_TOP_K,
            ["sku-1", "café-2", "sku-1"],
            Filters(brand="Acme", max_price=9.5, in_stock=True),
        )
    )

    assert set(sent_tensors) == {
        contract.USER_ID,
        contract.TOP_K,
        contract.RECENT_PRODUCT_IDS,
        contract.FILTER_BRAND,
        contract.FILTER_MAX_PRICE,
        contract.FILTER_IN_STOCK,
    }
    assert sent_tensors[contract.USER_ID][2].tolist() == [["Zoë".encode()]]
    shape, datatype, value = sent_tensors[contract.RECENT_PRODUCT_IDS]
    assert (shape, datatype) == ([1, 3], "BYTES")
    assert value.tolist() == [[b"sku-1", "café-2".encode(), b"sku-1"]]
    assert sent_tensors[contract.TOP_K][2].tolist() == [[contract.MAX_TOP_K]]
    assert sent_tensors[contract.FILTER_BRAND][:2] == ([1, 1], "BYTES")
    assert sent_tensors[contract.FILTER_MAX_PRICE][:2] == ([1, 1], "FP32")
    assert sent_tensors[contract.FILTER_MAX_PRICE][2].tolist() == [[9.5]]
    assert sent_tensors[contract.FILTER_IN_STOCK][2].tolist() == [[True]]


def test_recommend_takes_an_empty_user_id_for_the_non_personal_answer():
    sent_tensors = tensors(build_recommend_inputs(grpcclient, "", 3))
    assert sent_tensors[contract.USER_ID][2].tolist() == [[b""]]
    assert contract.RECENT_PRODUCT_IDS not in sent_tensors


def test_the_largest_recent_list_is_accepted():
    recent = [f"sku-{i}" for i in range(contract.MAX_RECENT_PRODUCTS)]
    sent_tensors = tensors(build_recommend_inputs(grpcclient, "u", 5, recent))
    assert sent_tensors[contract.RECENT_PRODUCT_IDS][0] == [1, contract.MAX_RECENT_PRODUCTS]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        pytest.param({"k": 0}, "between 1 and", id="k-0"),
        pytest.param({"k": contract.MAX_TOP_K + 1}, "between 1 and", id="k-too-big"),
        pytest.param({"k": True}, "between 1 and", id="k-bool"),
        pytest.param({"k": 2.0}, "between 1 and", id="k-float"),
        pytest.param({"user_id": None}, "user_id", id="user-none"),
        pytest.param({"user_id": 17}, "user_id", id="user-int"),
        pytest.param(
            {"user_id": "u" * (contract.MAX_USER_ID_BYTES + 1)},
            f"longer than {contract.MAX_USER_ID_BYTES} bytes",
            id="user-too-long",
        ),
        pytest.param(
            {"recent_product_ids": ["x"] * (contract.MAX_RECENT_PRODUCTS + 1)},
            f"at most {contract.MAX_RECENT_PRODUCTS} recent products",
            id="too-many-recent",
        ),
        pytest.param({"recent_product_ids": "sku-1"}, "got one string", id="recent-a-string"),
        pytest.param({"recent_product_ids": ["sku-1", ""]}, "recent product 1", id="recent-empty"),
        pytest.param({"recent_product_ids": [7]}, "recent product 0", id="recent-not-a-string"),
        pytest.param(
            {"recent_product_ids": ["x" * (contract.MAX_PRODUCT_ID_BYTES + 1)]},
            f"longer than {contract.MAX_PRODUCT_ID_BYTES} bytes",
            id="recent-too-long",
        ),
    ],
)
def test_bad_recommend_arguments_are_refused(arguments: dict[str, Any], fragment: str):
    call = {"user_id": "u1", "k": 10, **arguments}
    with pytest.raises(BadRequestError, match=fragment):
        build_recommend_inputs(grpcclient, call.pop("user_id"), call.pop("k"), **call)


# --- similar -------------------------------------------------------------------------------------


def test_similar_inputs_are_one_product_and_k_with_filters():
    sent_tensors = tensors(
        build_similar_inputs(grpcclient, "sku-9", 4, Filters(category="Tools > Drills"))
    )
    assert set(sent_tensors) == {contract.PRODUCT_ID, contract.TOP_K, contract.FILTER_CATEGORY}
    assert sent_tensors[contract.PRODUCT_ID][:2] == ([1, 1], "BYTES")
    assert sent_tensors[contract.PRODUCT_ID][2].tolist() == [[b"sku-9"]]
    assert sent_tensors[contract.TOP_K][:2] == ([1, 1], "INT32")
    assert sent_tensors[contract.TOP_K][2].tolist() == [[4]]
    assert sent_tensors[contract.FILTER_CATEGORY][2].tolist() == [[b"Tools > Drills"]]


@pytest.mark.parametrize(
    ("product_id", "k"),
    [("", 5), ("   ", 5), (None, 5), ("x" * (contract.MAX_PRODUCT_ID_BYTES + 1), 5), ("a", 0)],
    ids=["empty", "blank", "none", "too-long", "k-0"],
)
def test_bad_similar_arguments_are_refused(product_id, k):
    with pytest.raises(BadRequestError):
        build_similar_inputs(grpcclient, product_id, k)


# --- events --------------------------------------------------------------------------------------


def test_event_inputs_are_columns_of_n_without_timestamps_when_none_is_given():
    events = [
        ShopperEvent("u1", "sku-1"),
        {"user_id": "ü2", "product_id": "sku-2", "kind": "purchase", "quantity": 3},
        ShopperEvent("u1", "sku-3", kind="cart", quantity=contract.MAX_EVENT_QUANTITY),
    ]

    sent_tensors = tensors(build_event_inputs(grpcclient, events))

    assert set(sent_tensors) == {
        contract.EVENT_USER_IDS,
        contract.EVENT_PRODUCT_IDS,
        contract.EVENT_KINDS_INPUT,
        contract.EVENT_QUANTITIES,
    }
    assert sent_tensors[contract.EVENT_USER_IDS][:2] == ([3], "BYTES")
    assert sent_tensors[contract.EVENT_USER_IDS][2].tolist() == [b"u1", "ü2".encode(), b"u1"]
    assert sent_tensors[contract.EVENT_PRODUCT_IDS][2].tolist() == [b"sku-1", b"sku-2", b"sku-3"]
    assert sent_tensors[contract.EVENT_KINDS_INPUT][2].tolist() == [b"view", b"purchase", b"cart"]
    shape, datatype, value = sent_tensors[contract.EVENT_QUANTITIES]
    assert (shape, datatype) == ([3], "INT32")
    assert value.tolist() == [1, 3, contract.MAX_EVENT_QUANTITY]


def test_timestamps_are_sent_when_any_event_has_one_and_the_rest_get_now(monkeypatch):
    monkeypatch.setattr("time.time", lambda: 1_700_000_123.5)
    events = [
        ShopperEvent("u1", "sku-1"),
        ShopperEvent("u1", "sku-2", timestamp_s=1_600_000_000.25),
        {"user_id": "u2", "product_id": "sku-3", "timestamp_s": 0},
    ]

    sent_tensors = tensors(build_event_inputs(grpcclient, events))

    shape, datatype, value = sent_tensors[contract.EVENT_TIMESTAMPS]
    assert (shape, datatype) == ([3], "FP64")
    assert value.tolist() == [1_700_000_123.5, 1_600_000_000.25, 0.0]


def test_the_largest_write_is_accepted():
    events = [ShopperEvent(f"u{i}", "sku-1") for i in range(contract.MAX_EVENTS_PER_WRITE)]
    sent_tensors = tensors(build_event_inputs(grpcclient, events))
    assert sent_tensors[contract.EVENT_KINDS_INPUT][0] == [contract.MAX_EVENTS_PER_WRITE]


def one(**fields: Any) -> list:
    return [
        ShopperEvent("u0", "sku-0"),
        ShopperEvent(**{"user_id": "u1", "product_id": "p", **fields}),
    ]


BAD_EVENTS = [
    pytest.param([], "non-empty sequence", id="none"),
    pytest.param("u1,sku-1,view", "non-empty sequence", id="a-string"),
    pytest.param({"user_id": "u1", "product_id": "p"}, "non-empty sequence", id="one-mapping"),
    pytest.param(
        [ShopperEvent("u", "p")] * (contract.MAX_EVENTS_PER_WRITE + 1),
        f"{contract.MAX_EVENTS_PER_WRITE + 1} events in one write",
        id="too-many",
    ),
    pytest.param([("u1", "p", "view")], "event 0 must be a ShopperEvent or a mapping", id="tuple"),
    pytest.param(
        [{"user_id": "u1", "product_id": "p", "sku": "x"}], "event 0", id="mapping-unknown-key"
    ),
    pytest.param([{"user_id": "u1"}], "event 0", id="mapping-missing-key"),
    pytest.param(one(kind="like"), "event 1: kind", id="bad-kind"),
    pytest.param(one(kind="VIEW"), "event 1: kind", id="kind-upper-case"),
    pytest.param(one(quantity=True), "event 1: quantity must be an integer", id="quantity-bool"),
    pytest.param(one(quantity=2.0), "event 1: quantity must be an integer", id="quantity-float"),
    pytest.param(one(quantity=0), "event 1: quantity must be 1 to", id="quantity-0"),
    pytest.param(one(quantity=-1), "event 1: quantity must be 1 to", id="quantity-negative"),
    pytest.param(
        one(quantity=contract.MAX_EVENT_QUANTITY + 1), "event 1: quantity", id="quantity-too-big"
    ),
    pytest.param(one(user_id=""), "event 1: user_id", id="empty-user"),
    pytest.param(one(user_id="  "), "event 1: user_id", id="blank-user"),
    pytest.param(one(user_id=None), "event 1: user_id", id="no-user"),
    pytest.param(
        one(user_id="u" * (contract.MAX_USER_ID_BYTES + 1)), "event 1: user_id", id="user-too-long"
    ),
    pytest.param(one(product_id=""), "event 1", id="empty-product"),
    pytest.param(one(timestamp_s=math.nan), "timestamp", id="timestamp-nan"),
    pytest.param(one(timestamp_s=math.inf), "timestamp", id="timestamp-inf"),
    pytest.param(one(timestamp_s=-1.0), "timestamp", id="timestamp-negative"),
    pytest.param(one(timestamp_s="yesterday"), "timestamp", id="timestamp-text"),
    pytest.param(one(timestamp_s="1700000000"), "timestamp", id="timestamp-numeric-text"),
    pytest.param(one(timestamp_s=True), "timestamp", id="timestamp-bool"),
    pytest.param(one(timestamp_s=10**400), "timestamp", id="timestamp-beyond-float"),
]


@pytest.mark.parametrize(("events", "fragment"), BAD_EVENTS)
def test_bad_events_are_refused_whole(events, fragment: str):
    with pytest.raises(BadRequestError, match=fragment):
        build_event_inputs(grpcclient, events)


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


def test_parse_events_ack_reads_the_sequence_number_and_the_count():
    result = FakeResult(
        {
            contract.SEQUENCE_NUMBER: np.array([123], dtype=np.int64),
            contract.RECORDED: np.array([4], dtype=np.int64),
        }
    )
    ack = parse_events_ack(result)
    assert ack == EventsAck(sequence_number=123, recorded=4)
    assert type(ack.sequence_number) is int and type(ack.recorded) is int


# --- the clients, against a fake server ------------------------------------------------------


class FakeServer:
    """Answers `infer` as tritonserver would: hits for recommend/similar, an ack for events."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error: Exception | None = None

    def infer(self, model_name, inputs, outputs=None, client_timeout=None, parameters=None):
        request = tensors(inputs)
        self.calls.append(
            {
                "model": model_name,
                "inputs": request,
                "outputs": None if outputs is None else [o.name() for o in outputs],
                "timeout": client_timeout,
                "parameters": parameters,
            }
        )
        if self.error is not None:
            raise self.error
        if model_name == contract.EVENTS_MODEL:
            n = request[contract.EVENT_USER_IDS][0][0]
            return FakeResult(
                {
                    contract.SEQUENCE_NUMBER: np.array([100 + n], dtype=np.int64),
                    contract.RECORDED: np.array([n], dtype=np.int64),
                }
            )
        return FakeResult(
            {
                contract.PRODUCT_IDS: np.array([[b"sku-1", b"sku-2", b""]], dtype=object),
                contract.SCORES: np.array([[0.9, 0.5, 0.0]], dtype=np.float32),
                contract.TITLES: np.array([[b"Mug", b"Drill", b""]], dtype=object),
                contract.PRICES: np.array([[3.5, np.nan, np.nan]], dtype=np.float32),
                contract.IN_STOCK: np.array([[True, False, False]]),
            }
        )

    def close(self) -> None:
        pass


class FakeAsyncServer(FakeServer):
    async def infer(self, *args, **kwargs):  # type: ignore[override]
        return FakeServer.infer(self, *args, **kwargs)

    async def close(self) -> None:
        pass


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def connected(server: FakeServer, **kwargs: Any) -> SearchClient:
    client = SearchClient("localhost:1", **kwargs)  # a channel connects on first use: never here
    client._client.close()
    client._client = server
    return client


HITS = [Hit("sku-1", pytest.approx(0.9), "Mug", 3.5, True), Hit("sku-2", 0.5, "Drill", None, False)]


def test_recommend_asks_the_recommend_model(server):
    client = connected(server, timeout_s=1.5)

    hits = client.recommend("u1", k=2, recent_product_ids=["sku-3"], brand="Acme")

    assert hits == HITS
    (call,) = server.calls
    assert call["model"] == contract.RECOMMEND_MODEL
    assert set(call["inputs"]) == {
        contract.USER_ID,
        contract.TOP_K,
        contract.RECENT_PRODUCT_IDS,
        contract.FILTER_BRAND,
    }
    assert call["inputs"][contract.TOP_K][2].tolist() == [[2]]
    assert call["outputs"] is None and call["timeout"] == 1.5 and call["parameters"] is None


def test_similar_asks_the_similar_model(server):
    client = connected(server, write_key="s3cret")

    hits = client.similar("sku-9", k=3, min_price=1.0)

    assert hits == HITS
    (call,) = server.calls
    assert call["model"] == contract.SIMILAR_MODEL
    assert set(call["inputs"]) == {contract.PRODUCT_ID, contract.TOP_K, contract.FILTER_MIN_PRICE}
    assert call["inputs"][contract.PRODUCT_ID][2].tolist() == [[b"sku-9"]]
    assert call["parameters"] is None, "the write key goes with writes only"


def test_record_events_writes_to_the_events_model_with_the_write_key(server):
    client = connected(server, write_key="s3cret")

    ack = client.record_events([ShopperEvent("u1", "sku-1"), {"user_id": "u2", "product_id": "p"}])

    assert ack == EventsAck(sequence_number=102, recorded=2)
    (call,) = server.calls
    assert call["model"] == contract.EVENTS_MODEL
    assert call["parameters"] == {contract.WRITE_KEY_PARAMETER: "s3cret"}
    assert call["outputs"] == [contract.SEQUENCE_NUMBER, contract.RECORDED]
    assert call["timeout"] == protocol.DEFAULT_WRITE_TIMEOUT_S
    assert call["inputs"][contract.EVENT_PRODUCT_IDS][2].tolist() == [b"sku-1", b"p"]


def test_record_events_without_a_write_key_sends_no_parameters(server):
    connected(server).record_events([ShopperEvent("u1", "sku-1")], timeout_s=4.0)
    (call,) = server.calls
    assert call["parameters"] is None and call["timeout"] == 4.0


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.recommend("u1", k=0), id="recommend-k"),
        pytest.param(lambda c: c.recommend("u1", min_price=5, max_price=1), id="recommend-filter"),
        pytest.param(
            lambda c: c.recommend("u1", recent_product_ids="sku-1"), id="recommend-recent"
        ),
        pytest.param(lambda c: c.similar(""), id="similar-empty"),
        pytest.param(lambda c: c.similar("sku-1", brand="\u200b"), id="similar-filter"),
        pytest.param(lambda c: c.record_events([ShopperEvent("", "sku-1")]), id="events-user"),
        pytest.param(
            lambda c: c.record_events([ShopperEvent("u", "p", timestamp_s=math.nan)]),
            id="events-nan",
        ),
    ],
)
def test_bad_calls_are_refused_before_anything_is_sent(server, call):
    with pytest.raises(BadRequestError):
        call(connected(server, write_key="s3cret"))
    assert server.calls == []


def test_a_server_refusal_is_a_bad_request_error(server):
    server.error = InferenceServerException(
        msg="no live product 'sku-404' in the catalog", status="StatusCode.INVALID_ARGUMENT"
    )
    client = connected(server)
    with pytest.raises(BadRequestError, match="sku-404") as raised:
        client.similar("sku-404")
    assert raised.value.__cause__ is server.error
    with pytest.raises(BadRequestError, match="sku-404"):
        client.record_events([ShopperEvent("u1", "sku-404")])


def test_the_async_client_makes_the_same_calls():
    server = FakeAsyncServer()

    async def run():
        async with AsyncSearchClient("localhost:1", write_key="k") as client:
            await client._client.close()
            client._client = server
            recommended = await client.recommend("u1", k=2, in_stock=True)
            similar = await client.similar("sku-1")
            ack = await client.record_events([ShopperEvent("u1", "sku-1", kind="purchase")])
            with pytest.raises(BadRequestError):
                await client.record_events([ShopperEvent("u1", "sku-1", kind="like")])
            return recommended, similar, ack

    recommended, similar, ack = asyncio.run(run())

    assert recommended == similar == HITS
    assert ack == EventsAck(101, 1)
    recommend_call, similar_call, events_call = server.calls
    assert recommend_call["model"] == contract.RECOMMEND_MODEL
    assert set(recommend_call["inputs"]) == {
        contract.USER_ID,
        contract.TOP_K,
        contract.FILTER_IN_STOCK,
    }
    assert similar_call["model"] == contract.SIMILAR_MODEL
    assert events_call["model"] == contract.EVENTS_MODEL
    assert events_call["parameters"] == {contract.WRITE_KEY_PARAMETER: "k"}
    assert [c["parameters"] for c in (recommend_call, similar_call)] == [None, None]
