"""The `catalog` model (writes to the live catalog) through the fake backend module, with an
in-memory store and a fake embedder: what is embedded, what is written, what is answered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.serving.catalog import BlsEmbedder, CatalogModel, EmbeddingError, encoder_text
from tests.fakes.store import FakeStore
from tests.project import MODEL_REPOSITORY

DIMENSION = 8
ENCODER = "e" * 64


class FakeEmbedder:
    """A deterministic embedding per text; records every call; fails when told to."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_with: Exception | None = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if self.fail_with is not None:
            raise self.fail_with
        return np.stack([vector(text) for text in texts])

    @property
    def texts(self) -> list[str]:
        return [text for call in self.calls for text in call]


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).normal(size=DIMENSION)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def model(pb_utils, store: FakeStore, embedder: FakeEmbedder) -> CatalogModel:
    return CatalogModel(pb_utils, store, embedder, ENCODER)


def product(product_id: str, title: str, **fields: Any) -> dict[str, Any]:
    return {"id": product_id, "title": title, **fields}


def products(*records: dict[str, Any] | bytes | str) -> np.ndarray:
    """A `products` input as the backend hands it over: [n] object array of bytes."""
    array = np.empty(len(records), dtype=object)
    array[:] = [
        r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
        for r in records
    ]
    return array


def ids(*values: str | bytes) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v if isinstance(v, bytes) else v.encode() for v in values]
    return array


def ack(triton, response) -> tuple[int, int]:
    out = triton.outputs(response)
    assert set(out) == {contract.SEQUENCE_NUMBER, contract.CHANGED}
    for name in out:
        assert out[name].dtype == np.int64 and out[name].shape == (1,), name
    return int(out[contract.SEQUENCE_NUMBER][0]), int(out[contract.CHANGED][0])


def upsert(triton, model, *records) -> Any:
    (response,) = model.execute([triton.request(products=products(*records))])
    return response


def assert_error(triton, response, code: int, *fragments: str) -> str:
    assert response.has_error() and response.output_tensors() == []
    error = response.error()
    assert error.code() == code, error
    for fragment in fragments:
        assert fragment in error.message(), (fragment, error.message())
    return error.message()


MOUSE = product("sku-1", "Wireless mouse", brand="Logi", category="Peripherals > Mice", price=19.5)
SSD = product("sku-2", "NVMe SSD 1TB", category_path=["Components", "Storage"], price=79.0)


def test_new_products_are_embedded_written_and_acknowledged(triton, model, store, embedder):
    seq, changed = ack(triton, upsert(triton, model, MOUSE, SSD))

    assert (seq, changed) == (2, 2) and store.head() == 2
    assert embedder.texts == ["Wireless mouse | Mice | Logi", "NVMe SSD 1TB | Storage"]
    stored = store.get(["sku-1", "sku-2"], with_embeddings=True)
    assert stored["sku-1"].price == 19.5 and stored["sku-1"].brand == "Logi"
    assert stored["sku-1"].category_path == ("Peripherals", "Mice")
    assert stored["sku-2"].category_path == ("Components", "Storage")
    np.testing.assert_array_equal(stored["sku-2"].embedding, vector("NVMe SSD 1TB | Storage"))
    assert store.encoder_fingerprint == ENCODER


def test_a_text_change_embeds_only_the_changed_product(triton, model, store, embedder):
    upsert(triton, model, MOUSE, SSD)
    before = store.get(["sku-2"], with_embeddings=True)["sku-2"].embedding.copy()
    embedder.calls.clear()

    seq, changed = ack(
        triton, upsert(triton, model, {**MOUSE, "title": "Wireless mouse, silent"}, SSD)
    )

    assert (seq, changed) == (4, 2)
    assert embedder.calls == [["Wireless mouse, silent | Mice | Logi"]]
    stored = store.get(["sku-1", "sku-2"], with_embeddings=True)
    assert stored["sku-1"].title == "Wireless mouse, silent"
    np.testing.assert_array_equal(stored["sku-2"].embedding, before)
    assert triton.logged("INFO")[-1].startswith("catalog: upsert of 2 products (1 embedded)")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"price": 17.0}, id="price"),
        pytest.param({"in_stock": False}, id="stock"),
        pytest.param({"price": None, "colour": "black"}, id="no-price-new-attribute"),
        # The same category written as levels: the same embedded text.
        pytest.param(
            {"category": None, "category_path": ["Peripherals", "Mice"]}, id="category-as-path"
        ),
    ],
)
def test_a_change_the_encoder_does_not_see_embeds_nothing(
    triton, model, store, embedder, change: dict[str, Any]
):
    upsert(triton, model, MOUSE)
    embedder.calls.clear()

    assert ack(triton, upsert(triton, model, {**MOUSE, **change})) == (2, 1)

    assert embedder.calls == []
    stored = store.get(["sku-1"], with_embeddings=True)["sku-1"]
    assert stored.price == change.get("price", 19.5)
    assert stored.in_stock == change.get("in_stock", True)
    np.testing.assert_array_equal(stored.embedding, vector("Wireless mouse | Mice | Logi"))


def test_a_product_deleted_and_written_again_is_embedded_again(triton, model, store, embedder):
    upsert(triton, model, MOUSE)
    model.execute([triton.request(delete_ids=ids("sku-1"))])
    embedder.calls.clear()

    assert ack(triton, upsert(triton, model, MOUSE)) == (3, 1)
    assert embedder.calls == [["Wireless mouse | Mice | Logi"]]


def test_another_encoders_store_refuses_writes_until_re_embedded(pb_utils, triton, embedder):
    store = FakeStore()
    CatalogModel(pb_utils, store, embedder, "f" * 64).execute(
        [triton.request(products=products(MOUSE))]
    )
    model = CatalogModel(pb_utils, store, embedder, ENCODER)
    embedder.calls.clear()

    (response,) = model.execute([triton.request(products=products(SSD))])

    assert_error(
        triton, response, pb_utils.TritonError.UNAVAILABLE, "nothing was written", "re-embedded"
    )
    assert embedder.calls == [] and store.head() == 1


BAD_PRODUCTS = [
    pytest.param(b"{not json", ["product 1", "not valid JSON"], id="invalid-json"),
    pytest.param(b'{"id": "x", "title": "\xff"}', ["product 1", "UTF-8"], id="not-utf8"),
    pytest.param(b"[1, 2]", ["product 1", "JSON object"], id="not-an-object"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000, ["product 1", "nested"], id="deeply-nested"),
    pytest.param(product("x", ""), ["product 1", "'title'"], id="empty-title"),
    pytest.param({"title": "no id"}, ["product 1", "'id'"], id="no-id"),
    pytest.param(product("x", "Mouse", price="12.50"), ["'price'"], id="price-as-text"),
    pytest.param(product("x", "Mouse", price=-1), ["'price'", ">= 0"], id="negative-price"),
    pytest.param(b'{"id": "x", "title": "t", "price": NaN}', ["'price'"], id="nan-price"),
    pytest.param(product("x", "Mouse", in_stock="yes"), ["'in_stock'"], id="stock-as-text"),
    pytest.param(product("sku-1", "Twice"), ["product 1", "twice"], id="id-twice"),
    pytest.param(product("x", "\u200b\u200b"), ["product 1", "no visible"], id="invisible-title"),
    pytest.param(
        b'{"id": "x", "title": "t", "weight": NaN}', ["product 1", "NaN"], id="nan-attribute"
    ),
    pytest.param(
        product("x", "Mouse", description="d" * contract.MAX_PRODUCT_JSON_BYTES),
        ["product 1", f"maximum is {contract.MAX_PRODUCT_JSON_BYTES}"],
        id="too-large",
    ),
    pytest.param(
        product("x" * (contract.MAX_PRODUCT_ID_BYTES + 1), "Mouse"), ["'id'"], id="id-too-long"
    ),
    # PostgreSQL stores no NUL: refused for every store alike.
    pytest.param(product("x", "Mou\x00se"), ["product 1", "NUL"], id="nul-in-title"),
    pytest.param(
        product("x", "Mouse", specs={"colour": ["bl\x00ck"]}), ["NUL"], id="nul-in-attributes"
    ),
]


@pytest.mark.parametrize(("bad", "fragments"), BAD_PRODUCTS)
def test_a_bad_product_fails_its_whole_write_and_nothing_is_written(
    triton, model, store, embedder, bad, fragments: list[str]
):
    response = upsert(triton, model, MOUSE, bad, SSD)

    triton.assert_invalid_arg(response, *fragments)
    assert store.writes == [] and store.head() == 0
    assert embedder.calls == []


def test_the_other_requests_of_an_execute_are_written(triton, model, store):
    upsert(triton, model, SSD)

    responses = model.execute(
        [
            triton.request(products=products(MOUSE)),
            triton.request(products=products(product("sku-3", "Keyboard"), b"{oops")),
            triton.request(delete_ids=ids("sku-2")),
            triton.request(products=products(product("sku-3", "Keyboard"))),
        ]
    )

    assert len(responses) == 4
    assert ack(triton, responses[0]) == (2, 1)
    triton.assert_invalid_arg(responses[1], "product 1", "not valid JSON")
    assert ack(triton, responses[2]) == (3, 1)
    assert ack(triton, responses[3]) == (4, 1)
    assert sorted(store.get(["sku-1", "sku-2", "sku-3"])) == ["sku-1", "sku-3"]


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({}, id="neither"),
        pytest.param({"products": products(MOUSE), "delete_ids": ids("sku-1")}, id="both"),
    ],
)
def test_a_write_is_either_an_upsert_or_a_delete(triton, model, store, inputs):
    (response,) = model.execute([triton.request(**inputs)])
    triton.assert_invalid_arg(response, "'products'", "'delete_ids'", "not both or neither")
    assert store.writes == []


@pytest.mark.parametrize(
    ("name", "values", "fragments"),
    [
        pytest.param(
            "products",
            products(*[product(f"p{i}", "t") for i in range(contract.MAX_PRODUCTS_PER_WRITE + 1)]),
            [f"{contract.MAX_PRODUCTS_PER_WRITE + 1} products", "several writes"],
            id="too-many-products",
        ),
        pytest.param(
            "delete_ids",
            ids(*[f"p{i}" for i in range(contract.MAX_PRODUCTS_PER_WRITE + 1)]),
            [f"{contract.MAX_PRODUCTS_PER_WRITE + 1} ids"],
            id="too-many-ids",
        ),
        pytest.param("products", products(), ["0 products"], id="no-products"),
        pytest.param("delete_ids", ids(), ["0 ids"], id="no-ids"),
        pytest.param(
            "products", products(MOUSE, SSD).reshape(2, 1), ["shape [n]"], id="products-2d"
        ),
        pytest.param("delete_ids", ids("a", "b").reshape(1, 2), ["shape [n]"], id="ids-2d"),
        pytest.param("delete_ids", ids("sku-1", ""), ["id 1", "empty"], id="empty-id"),
        pytest.param("delete_ids", ids("  "), ["id 0", "empty"], id="blank-id"),
        pytest.param("delete_ids", ids(b"\xc3"), ["id 0", "UTF-8"], id="id-not-utf8"),
        pytest.param(
            "delete_ids",
            ids("x" * (contract.MAX_PRODUCT_ID_BYTES + 1)),
            [f"maximum is {contract.MAX_PRODUCT_ID_BYTES}"],
            id="id-too-long",
        ),
    ],
)
def test_write_sizes_and_ids_are_checked(triton, model, store, name, values, fragments):
    upsert(triton, model, MOUSE)
    (response,) = model.execute([triton.request(**{name: values})])
    triton.assert_invalid_arg(response, *fragments)
    assert store.writes == [("upsert", ["sku-1"])]


def test_the_largest_write_is_accepted(triton, model, store, embedder):
    many = [product(f"p{i}", f"Part {i}") for i in range(contract.MAX_PRODUCTS_PER_WRITE)]
    assert ack(triton, upsert(triton, model, *many)) == (
        contract.MAX_PRODUCTS_PER_WRITE,
        contract.MAX_PRODUCTS_PER_WRITE,
    )
    assert len(embedder.texts) == contract.MAX_PRODUCTS_PER_WRITE


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL"])
def test_an_embedding_failure_fails_the_write_with_its_code_and_writes_nothing(
    pb_utils, triton, model, store, embedder, code: str
):
    upsert(triton, model, MOUSE)
    embedder.fail_with = EmbeddingError(
        "embedding failed in query_encoder: Exceeds maximum queue size",
        getattr(pb_utils.TritonError, code),
    )

    responses = model.execute(
        [
            triton.request(products=products({**MOUSE, "title": "Mouse 2"}, SSD)),
            triton.request(delete_ids=ids("sku-1")),
        ]
    )

    message = assert_error(
        triton, responses[0], getattr(pb_utils.TritonError, code), "nothing was written"
    )
    assert "Exceeds maximum queue size" in message
    assert ack(triton, responses[1]) == (2, 1)
    assert store.writes == [("upsert", ["sku-1"]), ("delete", ["sku-1"])]
    embedder.fail_with = None
    assert ack(triton, upsert(triton, model, SSD)) == (3, 1)


def test_an_embedder_bug_is_internal_with_an_id_and_writes_nothing(
    pb_utils, triton, model, store, embedder
):
    embedder.fail_with = ZeroDivisionError("boom")
    message = assert_error(triton, upsert(triton, model, MOUSE), pb_utils.TritonError.INTERNAL)
    assert "internal error" in message and "boom" not in message
    assert store.writes == []


def test_a_store_failure_is_internal_logged_and_the_model_keeps_serving(
    pb_utils, triton, model, store
):
    from ecomsearch.store import StoreError

    store.fail_next = StoreError("catalog store memory://fake: database is locked")

    message = assert_error(triton, upsert(triton, model, MOUSE), pb_utils.TritonError.INTERNAL)

    error_id = message.split("internal error ")[1].split(",")[0]
    assert "database is locked" not in message
    (logged,) = triton.logged("ERROR")
    assert error_id in logged and "database is locked" in logged and "Traceback" in logged
    assert store.writes == []
    assert ack(triton, upsert(triton, model, MOUSE)) == (1, 1)


def test_delete_tombstones_known_ids_and_skips_the_rest(triton, model, store):
    upsert(triton, model, MOUSE, SSD)

    (response,) = model.execute([triton.request(delete_ids=ids("sku-1", "nope", "sku-1"))])

    assert ack(triton, response) == (3, 1)
    assert store.writes[-1] == ("delete", ["sku-1"])
    assert list(store.get(["sku-1", "sku-2"])) == ["sku-2"]
    assert "catalog: delete of 2 ids: 1 changed, seq 3" in triton.logged("INFO")[-1]


def test_a_write_that_changes_nothing_answers_the_current_sequence_number(triton, model, store):
    upsert(triton, model, MOUSE, SSD)
    (response,) = model.execute([triton.request(delete_ids=ids("unknown"))])
    assert ack(triton, response) == (2, 0)


def test_each_write_is_logged_with_its_size_seq_and_time(triton, model):
    upsert(triton, model, MOUSE, SSD)
    (message,) = triton.logged("INFO")
    assert message.startswith("catalog: upsert of 2 products (2 embedded): 2 changed, seq 2, ")
    assert message.endswith(" ms")


# --- The BLS embedder ---------------------------------------------------------------------------


@pytest.fixture
def bls(pb_utils, monkeypatch: pytest.MonkeyPatch):
    """pb_utils with BLS: InferenceRequest.exec() answers as preprocess and query_encoder would,
    recording each request; `bls.errors[model]` makes that model answer with an error."""

    class Bls:
        requests: list[Any] = []  # noqa: RUF012
        errors: dict[str, Any] = {}  # noqa: RUF012

    class Request(pb_utils.InferenceRequest):
        def __init__(self, *, preferred_memory, **kwargs) -> None:
            super().__init__(**kwargs)
            self.preferred_memory = preferred_memory

        def exec(self):
            Bls.requests.append(self)
            name = self.model_name()
            if name in Bls.errors:
                return pb_utils.InferenceResponse(error=Bls.errors[name])
            inputs = {t.name(): t.as_numpy() for t in self.inputs()}
            if name == contract.PREPROCESS_MODEL:
                rows = len(inputs[contract.QUERY])
                outputs = {
                    contract.INPUT_IDS: np.arange(rows * 16, dtype=np.int64).reshape(rows, 16),
                    contract.ATTENTION_MASK: np.ones((rows, 16), dtype=np.int64),
                }
            else:
                first = inputs[contract.INPUT_IDS][:, :1].astype(np.float32)
                outputs = {contract.EMBEDDING: np.repeat(first, DIMENSION, axis=1)}
            return pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, outputs[n]) for n in self.requested_output_names()]
            )

    monkeypatch.setattr(pb_utils, "InferenceRequest", Request)
    monkeypatch.setattr(pb_utils, "TRITONSERVER_MEMORY_CPU", 0, raising=False)
    monkeypatch.setattr(
        pb_utils, "PreferredMemory", lambda kind, device=0: ("memory", kind, device), raising=False
    )
    return Bls


def test_bls_embedding_goes_through_preprocess_and_the_encoder_in_chunks(pb_utils, bls):
    texts = [f"product {i}" for i in range(contract.MAX_QUERIES_PER_REQUEST + 6)]

    embeddings = BlsEmbedder(pb_utils)(texts)

    assert embeddings.shape == (len(texts), DIMENSION) and embeddings.dtype == np.float32
    # Rows in order: chunk 1 starts at 0, chunk 2 again at 0 (the fake's ids restart).
    assert embeddings[1, 0] == 16 and embeddings[contract.MAX_QUERIES_PER_REQUEST, 0] == 0
    models = [request.model_name() for request in bls.requests]
    assert models == [contract.PREPROCESS_MODEL, contract.ENCODER_MODEL] * 2
    first = {t.name(): t.as_numpy() for t in bls.requests[0].inputs()}
    assert first[contract.QUERY].shape == (contract.MAX_QUERIES_PER_REQUEST, 1)
    assert first[contract.QUERY][0, 0] == b"product 0"
    assert (first[contract.MAX_TOKENS] == contract.PRODUCT_MAX_TOKENS).all()
    assert first[contract.MAX_TOKENS].dtype == np.int32
    assert all(r.preferred_memory == ("memory", 0, 0) for r in bls.requests)


@pytest.mark.parametrize(
    ("model_name", "code", "expected"),
    [
        (contract.ENCODER_MODEL, "UNAVAILABLE", "UNAVAILABLE"),
        (contract.PREPROCESS_MODEL, "INVALID_ARG", "INTERNAL"),
        (contract.ENCODER_MODEL, "INTERNAL", "INTERNAL"),
    ],
)
def test_a_bls_error_keeps_unavailable_and_is_otherwise_internal(
    pb_utils, bls, model_name: str, code: str, expected: str
):
    bls.errors[model_name] = pb_utils.TritonError(
        "Exceeds maximum queue size", getattr(pb_utils.TritonError, code)
    )
    with pytest.raises(EmbeddingError, match=f"{model_name}: Exceeds maximum queue size") as e:
        BlsEmbedder(pb_utils)(["mouse"])
    assert e.value.code == getattr(pb_utils.TritonError, expected)


def test_text_beyond_what_preprocess_accepts_is_cut_at_a_character():
    text = "Mouse | " + "é" * contract.MAX_QUERY_BYTES
    cut = encoder_text(text)
    assert len(cut.encode("utf-8")) <= contract.MAX_QUERY_BYTES
    assert text.startswith(cut) and len(cut) > contract.MAX_QUERY_BYTES // 2 - 8
    assert encoder_text("  Mouse\t\u200b pad ") == "Mouse pad"


# --- The served model ---------------------------------------------------------------------------


def test_the_config_declares_the_contracts_tensors(triton):
    model_dir = MODEL_REPOSITORY / contract.CATALOG_MODEL
    config = json.loads(triton.args(model_dir / "config.pbtxt", model_dir)["model_config"])
    assert config["name"] == contract.CATALOG_MODEL and config["backend"] == "python"
    assert config["max_batch_size"] == 0
    inputs = {t["name"]: t for t in config["input"]}
    assert set(inputs) == {contract.PRODUCTS, contract.DELETE_IDS}
    assert all(t["optional"] and t["data_type"] == "TYPE_STRING" for t in inputs.values())
    assert all(t["dims"] == [-1] for t in inputs.values())
    outputs = {t["name"]: (t["data_type"], t["dims"]) for t in config["output"]}
    assert outputs == {
        contract.SEQUENCE_NUMBER: ("TYPE_INT64", [1]),
        contract.CHANGED: ("TYPE_INT64", [1]),
    }
    (group,) = config["instance_group"]
    assert group["kind"] == "KIND_CPU" and group["count"] == 1


def test_model_py_serves_the_store_the_environment_names(triton, monkeypatch, tmp_path):
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.store import open_store

    layout = ModelRepositoryLayout(tmp_path / "repository")
    layout.encoder_onnx.parent.mkdir(parents=True)
    layout.encoder_onnx.write_bytes(b"stand-in encoder")
    store_path = tmp_path / "catalog.sqlite3"
    monkeypatch.setenv("ECOMSEARCH_STORE_URL", str(store_path))
    model_dir = triton.copy_model_dir(contract.CATALOG_MODEL, layout.root)
    model = triton.initialize(
        model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
    )

    # A delete needs no encoder: the real store answers through the adapter.
    (response,) = model.execute([triton.request(delete_ids=ids("sku-1"))])
    assert ack(triton, response) == (0, 0)
    (message,) = [m for m in triton.logged("INFO") if m.startswith("catalog: store")]
    assert hashlib.sha256(b"stand-in encoder").hexdigest()[:12] in message
    model.finalize()
    with open_store(str(store_path)) as store:
        assert store.head() == 0


def test_without_a_store_the_model_loads_and_refuses_writes(triton, monkeypatch, tmp_path):
    from ecomsearch.paths import ModelRepositoryLayout

    layout = ModelRepositoryLayout(tmp_path / "repository")
    layout.encoder_onnx.parent.mkdir(parents=True)
    layout.encoder_onnx.write_bytes(b"stand-in encoder")
    monkeypatch.delenv("ECOMSEARCH_STORE_URL", raising=False)
    monkeypatch.setattr("ecomsearch.live.location.served_store_url", lambda layout: None)
    model_dir = triton.copy_model_dir(contract.CATALOG_MODEL, layout.root)
    model = triton.initialize(
        model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
    )

    responses = model.execute(
        [triton.request(delete_ids=ids("sku-1")), triton.request(products=products(MOUSE))]
    )

    for response in responses:
        assert_error(triton, response, triton.pb_utils.TritonError.UNSUPPORTED, "no writes")
    (warning,) = triton.logged("WARNING")
    assert "every write is refused" in warning
    model.finalize()


@pytest.mark.parametrize(
    "parameters",
    [None, {}, {contract.WRITE_KEY_PARAMETER: "wrong"}, {contract.WRITE_KEY_PARAMETER: 7}],
    ids=["no-parameters", "no-key", "wrong-key", "not-a-string"],
)
def test_with_a_write_key_a_write_without_it_is_refused_and_writes_nothing(
    pb_utils, triton, store, embedder, parameters
) -> None:
    model = CatalogModel(pb_utils, store, embedder, ENCODER, write_key="s3cret")
    refused, allowed = model.execute(
        [
            triton.request(parameters=parameters, products=products(MOUSE)),
            triton.request(
                parameters={contract.WRITE_KEY_PARAMETER: "s3cret"}, products=products(SSD)
            ),
        ]
    )
    message = assert_error(triton, refused, pb_utils.TritonError.INVALID_ARG, "write key")
    assert "s3cret" not in message
    assert ack(triton, allowed) == (1, 1)
    assert set(store.get(["sku-1", "sku-2"])) == {"sku-2"}


def test_refused_writes_count_by_reason(pb_utils, triton, store, embedder) -> None:
    from ecomsearch.serving.metrics import REQUESTS_REJECTED

    args = {"model_name": "catalog", "model_version": "1", "model_instance_name": "catalog_0_0"}
    model = CatalogModel(pb_utils, store, embedder, ENCODER, write_key="s3cret").instrumented(args)
    key = {contract.WRITE_KEY_PARAMETER: "s3cret"}
    model.execute(
        [
            triton.request(
                parameters={contract.WRITE_KEY_PARAMETER: "guess"}, products=products(SSD)
            ),
            triton.request(parameters=key, products=products(b"{not json")),
            triton.request(parameters=key, products=products(SSD)),
        ]
    )

    family = pb_utils.MetricFamily.registry[REQUESTS_REJECTED.name]
    labels = {"model": "catalog", "version": "1", "model_instance": "catalog_0_0"}
    assert family.value(**labels, reason="unauthenticated") == 1
    assert family.value(**labels, reason="invalid_argument") == 1
    others = {dict(key)["reason"]: m.value() for key, m in family.metrics.items()}
    # Every reason's series exists from the start (at 0), so rate() sees its first event.
    assert others == {
        "unauthenticated": 1,
        "invalid_argument": 1,
        "internal": 0,
        "unavailable": 0,
        "unsupported": 0,
    }, "the acknowledged write counts nowhere"
