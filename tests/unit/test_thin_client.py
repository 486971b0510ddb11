"""The thin client: it installs and imports with tritonclient[grpc] and numpy alone, and the
requests it sends (searches with filters, catalog writes) against a fake server."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from ecomsearch import contract
from ecomsearch.client import (
    AsyncSearchClient,
    BadRequestError,
    Hit,
    SearchClient,
    ServiceUnavailableError,
    WriteAck,
)

HEAVY = ("torch", "transformers", "faiss", "onnxruntime", "tokenizers", "bm25s", "onnx")


def test_importing_the_client_and_cli_search_pulls_in_no_heavy_dependency():
    probe = (
        "import sys\n"
        "import ecomsearch.client, ecomsearch.cli\n"
        "ecomsearch.cli.build_parser().parse_args(['search', 'mouse'])\n"
        "ecomsearch.cli.build_parser().parse_args(['catalog', 'delete', 'sku-1'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == "[]", completed.stdout


def test_the_client_extra_needs_nothing_beyond_the_base_dependencies():
    from pathlib import Path

    import tomllib

    from tests.project import PROJECT_ROOT

    project = tomllib.loads(Path(PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("[")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert base == {"numpy", "tritonclient"}
    assert project["optional-dependencies"]["client"] == []


# --- Requests and responses, against a fake server ----------------------------------------------

_DTYPES = {"BYTES": None, "FP32": np.float32, "INT32": np.int32, "BOOL": bool}


def sent(infer_input) -> np.ndarray:
    """What an InferInput carries, as numpy (BYTES as an object array of bytes)."""
    raw = infer_input._get_content()
    dtype = _DTYPES[infer_input.datatype()]
    values = deserialize_bytes_tensor(raw) if dtype is None else np.frombuffer(raw, dtype)
    return values.reshape(infer_input.shape())


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


class FakeServer:
    """Answers `infer` like tritonserver's client would: search results or a write ack."""

    def __init__(self, with_prices: bool = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.with_prices = with_prices
        self.error: Exception | None = None

    def infer(self, model_name, inputs, outputs=None, client_timeout=None, parameters=None):
        request = {i.name(): sent(i) for i in inputs}
        self.calls.append(
            {
                "parameters": parameters,
                "model": model_name,
                "inputs": request,
                "shapes": {i.name(): (i.shape(), i.datatype()) for i in inputs},
                "outputs": None if outputs is None else [o.name() for o in outputs],
                "timeout": client_timeout,
            }
        )
        if self.error is not None:
            raise self.error
        if model_name == contract.CATALOG_MODEL:
            (values,) = request.values()
            return FakeResult(
                {
                    contract.SEQUENCE_NUMBER: np.array([41 + len(values)], dtype=np.int64),
                    contract.CHANGED: np.array([len(values)], dtype=np.int64),
                }
            )
        n = len(request[contract.QUERY])
        result = {
            contract.PRODUCT_IDS: np.array([[b"sku-1", b"sku-2", b""]] * n, dtype=object),
            contract.SCORES: np.array([[0.9, 0.5, 0.0]] * n, dtype=np.float32),
            contract.TITLES: np.array([[b"Mouse", "Café mug".encode(), b""]] * n, dtype=object),
        }
        if contract.EXPLAIN in request:
            explained = json.dumps({"score": 0.9, "base_value": 0.1, "contributions": {}})
            result[contract.EXPLANATIONS] = np.array([[explained.encode(), b"", b""]] * n, object)
        if self.with_prices:
            result[contract.PRICES] = np.array([[19.5, np.nan, np.nan]] * n, dtype=np.float32)
            result[contract.IN_STOCK] = np.array([[True, False, False]] * n)
        return FakeResult(result)

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


@pytest.fixture
def client(server: FakeServer) -> SearchClient:
    client = SearchClient("localhost:1")  # a channel connects on first use: never here
    client._client.close()
    client._client = server
    return client


def test_search_sends_no_filter_inputs_when_none_are_set(client, server):
    hits = client.search("mouse", k=3)

    (call,) = server.calls
    assert call["model"] == contract.SEARCH_MODEL
    assert set(call["inputs"]) == {contract.QUERY, contract.TOP_K}
    # Every output the server has: prices and stock where it has them.
    assert call["outputs"] is None and call["timeout"] == contract.DEFAULT_CLIENT_TIMEOUT_S
    assert hits == [
        Hit("sku-1", pytest.approx(0.9), "Mouse", price=19.5, in_stock=True),
        Hit("sku-2", pytest.approx(0.5), "Café mug", price=None, in_stock=False),
    ]


def test_explain_asks_for_every_query_and_reads_each_hits_explanation(client, server):
    plain = client.search("mouse")
    assert all(hit.explanation is None for hit in plain)
    assert contract.EXPLAIN not in server.calls[-1]["inputs"]

    first, second = client.search_batch(["mouse", "pad"], k=3, explain=True)
    flags = server.calls[-1]["inputs"][contract.EXPLAIN]
    assert server.calls[-1]["shapes"][contract.EXPLAIN] == ([2, 1], "BOOL")
    assert flags.tolist() == [[True], [True]]
    assert first[0].explanation == {"score": 0.9, "base_value": 0.1, "contributions": {}}
    assert first[1].explanation is None  # the server sent no explanation for it
    assert second[0].explanation == first[0].explanation
    with pytest.raises(BadRequestError, match="explain"):
        client.search("mouse", explain="yes")


def test_hits_from_a_server_without_prices_say_nothing_about_them():
    server = FakeServer(with_prices=False)
    client = SearchClient("localhost:1")
    client._client.close()
    client._client = server
    (first, _) = client.search("mouse")
    assert first.price is None and first.in_stock is None


def test_each_filter_set_is_sent_for_every_query(client, server):
    queries = [f"query {i}" for i in range(contract.MAX_QUERIES_PER_REQUEST + 2)]

    client.search_batch(
        queries,
        k=5,
        category="Components > Storage",
        brand="Samsung",
        min_price=10,
        max_price=99.5,
        in_stock=True,
    )

    assert [len(call["inputs"][contract.QUERY]) for call in server.calls] == [64, 2]
    last = server.calls[-1]
    assert last["shapes"] == {
        contract.QUERY: ([2, 1], "BYTES"),
        contract.TOP_K: ([2, 1], "INT32"),
        contract.FILTER_CATEGORY: ([2, 1], "BYTES"),
        contract.FILTER_BRAND: ([2, 1], "BYTES"),
        contract.FILTER_MIN_PRICE: ([2, 1], "FP32"),
        contract.FILTER_MAX_PRICE: ([2, 1], "FP32"),
        contract.FILTER_IN_STOCK: ([2, 1], "BOOL"),
    }
    inputs = last["inputs"]
    assert (inputs[contract.FILTER_CATEGORY] == b"Components > Storage").all()
    assert (inputs[contract.FILTER_BRAND] == b"Samsung").all()
    assert (inputs[contract.FILTER_MIN_PRICE] == 10).all()
    assert (inputs[contract.FILTER_MAX_PRICE] == 99.5).all()
    assert inputs[contract.FILTER_IN_STOCK].all()


@pytest.mark.parametrize(
    ("filters", "sent_names"),
    [
        ({"in_stock": False}, set()),
        ({"in_stock": True}, {contract.FILTER_IN_STOCK}),
        ({"brand": ""}, set()),
        ({"max_price": 0}, {contract.FILTER_MAX_PRICE}),
        (
            {"min_price": 5.0, "max_price": 5.0},
            {contract.FILTER_MIN_PRICE, contract.FILTER_MAX_PRICE},
        ),
    ],
)
def test_only_the_filters_that_restrict_are_sent(client, server, filters, sent_names):
    client.search("mouse", **filters)
    (call,) = server.calls
    assert set(call["inputs"]) - {contract.QUERY, contract.TOP_K} == sent_names


@pytest.mark.parametrize(
    ("filters", "fragment"),
    [
        ({"category": "x" * (contract.MAX_FILTER_BYTES + 1)}, "longer than"),
        ({"brand": "é" * (contract.MAX_FILTER_BYTES // 2 + 1)}, "longer than"),
        ({"brand": " \u200b "}, "no visible text"),
        ({"category": " > "}, "names no category"),
        ({"brand": 3}, "must be a string"),
        ({"min_price": -1}, "finite price >= 0"),
        ({"max_price": math.nan}, "finite price >= 0"),
        ({"max_price": math.inf}, "finite price >= 0"),
        ({"max_price": 1e39}, "finite price >= 0"),
        ({"min_price": "10"}, "must be a number"),
        ({"min_price": True}, "must be a number"),
        ({"min_price": 20, "max_price": 10}, "exceeds max_price"),
        ({"in_stock": "yes"}, "in_stock"),
    ],
)
def test_bad_filters_are_refused_before_sending(client, server, filters, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        client.search("mouse", **filters)
    assert server.calls == []


MOUSE = {"id": "sku-1", "title": "Wireless mouse", "price": 19.5, "colour": "black"}
SSD = {"id": "sku-2", "title": "NVMe SSD", "category_path": ["Components", "Storage"]}


def test_upsert_sends_one_json_object_per_product_to_the_catalog_model(client, server):
    ack = client.upsert_products([MOUSE, SSD])

    assert ack == WriteAck(sequence_number=43, changed=2)
    (call,) = server.calls
    assert call["model"] == contract.CATALOG_MODEL
    assert call["shapes"] == {contract.PRODUCTS: ([2], "BYTES")}
    assert [json.loads(v) for v in call["inputs"][contract.PRODUCTS]] == [MOUSE, SSD]
    assert call["outputs"] == [contract.SEQUENCE_NUMBER, contract.CHANGED]
    assert call["timeout"] == 30.0


def test_upsert_keeps_text_as_utf8_and_the_json_compact(client, server):
    client.upsert_products([{"id": "sku-3", "title": "Café mug"}])
    (value,) = server.calls[0]["inputs"][contract.PRODUCTS]
    assert value == '{"id":"sku-3","title":"Café mug"}'.encode()


def test_delete_sends_the_ids(client, server):
    ack = client.delete_products(["sku-1", "sku-1", "nope"], timeout_s=5.0)
    assert ack == WriteAck(sequence_number=44, changed=3)
    (call,) = server.calls
    assert call["model"] == contract.CATALOG_MODEL and call["timeout"] == 5.0
    assert list(call["inputs"][contract.DELETE_IDS]) == [b"sku-1", b"sku-1", b"nope"]


TOO_MANY = [{"id": f"p{i}", "title": "t"} for i in range(contract.MAX_PRODUCTS_PER_WRITE + 1)]


@pytest.mark.parametrize(
    ("products", "fragment"),
    [
        ([], "no products"),
        (MOUSE, "one dict"),
        (TOO_MANY, "all or nothing"),
        ([MOUSE, "sku-2"], "product 1 must be a mapping"),
        ([{"title": "no id"}], "product 0: the id"),
        ([{"id": 7, "title": "t"}], "product 0: the id"),
        ([{"id": "  ", "title": "t"}], "product 0: the id"),
        ([{"id": "x" * (contract.MAX_PRODUCT_ID_BYTES + 1)}], "longer than"),
        ([MOUSE, MOUSE], "appears twice"),
        ([{"id": "x", "title": "t", "price": math.nan}], "not JSON"),
        ([{"id": "x", "title": "t", "when": object()}], "not JSON"),
        (
            [{"id": "x", "title": "t", "description": "d" * contract.MAX_PRODUCT_JSON_BYTES}],
            "bytes of JSON",
        ),
    ],
)
def test_bad_upserts_are_refused_whole_before_sending(client, server, products, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        client.upsert_products(products)
    assert server.calls == []


@pytest.mark.parametrize(
    ("ids", "fragment"),
    [
        ([], "no ids"),
        ("sku-1", "one str"),
        ([f"p{i}" for i in range(contract.MAX_PRODUCTS_PER_WRITE + 1)], "maximum is"),
        (["sku-1", ""], "id 1"),
        ([None], "id 0"),
    ],
)
def test_bad_deletes_are_refused_before_sending(client, server, ids, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        client.delete_products(ids)
    assert server.calls == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", BadRequestError),
        ("StatusCode.UNAVAILABLE", ServiceUnavailableError),
    ],
)
def test_write_errors_map_like_search_errors(client, server, status, kind):
    server.error = InferenceServerException(msg="product 0: 'title' must be...", status=status)
    with pytest.raises(kind, match="product 0") as raised:
        client.upsert_products([MOUSE])
    assert raised.value.__cause__ is server.error


def test_the_async_client_sends_the_same_requests():
    server = FakeAsyncServer()

    async def run() -> tuple[list[Hit], WriteAck, WriteAck]:
        async with AsyncSearchClient("localhost:1") as client:
            await client._client.close()
            client._client = server
            hits = await client.search("mouse", brand="Logi", in_stock=True)
            with pytest.raises(BadRequestError):
                await client.search("mouse", min_price=5, max_price=1)
            return hits, await client.upsert_products([MOUSE]), await client.delete_products(["x"])

    hits, upserted, deleted = asyncio.run(run())

    assert hits[0] == Hit("sku-1", pytest.approx(0.9), "Mouse", price=19.5, in_stock=True)
    assert upserted == WriteAck(42, 1) and deleted == WriteAck(42, 1)
    search, upsert, delete = server.calls
    assert set(search["inputs"]) == {
        contract.QUERY,
        contract.TOP_K,
        contract.FILTER_BRAND,
        contract.FILTER_IN_STOCK,
    }
    assert upsert["model"] == delete["model"] == contract.CATALOG_MODEL
    assert set(delete["inputs"]) == {contract.DELETE_IDS}


def test_writes_carry_the_write_key_and_searches_never_do(server) -> None:
    client = SearchClient("localhost:1", write_key="s3cret")
    client._client.close()
    client._client = server
    client.upsert_products([{"id": "a", "title": "A"}])
    client.delete_products(["a"])
    client.search("mouse")
    writes, search = server.calls[:2], server.calls[2]
    assert [call["parameters"] for call in writes] == [{contract.WRITE_KEY_PARAMETER: "s3cret"}] * 2
    assert search["parameters"] is None


def test_without_a_write_key_writes_send_no_parameters(client, server) -> None:
    client.upsert_products([{"id": "a", "title": "A"}])
    assert server.calls[0]["parameters"] is None
