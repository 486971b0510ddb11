"""model_repository/retrieve/1/model.py driven through the fake backend module, over a tiny
exact index whose neighbours are computed here with numpy."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.index.manifest import IndexLoadError
from ecomsearch.index.store import CatalogIndex
from ecomsearch.serving.retrieve import RetrieveModel, place_on_device

DIMENSION = 384  # the config's embedding dims
PRODUCTS = 12
ENCODER_BYTES = b"stand-in for the exported encoder graph"


@pytest.fixture
def repository(tmp_path: Path, triton, tiny_index_factory):
    """tmp_path laid out as a model repository: retrieve/ with a tiny index in 1/index, and
    query_encoder/1/model.onnx, whose checksum the index's manifest records."""
    encoder = tmp_path / contract.ENCODER_MODEL / "1" / "model.onnx"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(ENCODER_BYTES)
    model_dir = triton.copy_model_dir(contract.RETRIEVE_MODEL, tmp_path)
    tiny = tiny_index_factory(
        model_dir / "1" / "index",
        hashlib.sha256(ENCODER_BYTES).hexdigest(),
        rows=PRODUCTS,
        dimension=DIMENSION,
    )
    return model_dir, tiny


@pytest.fixture
def model_dir(repository) -> Path:
    return repository[0]


@pytest.fixture
def tiny(repository):
    return repository[1]


@pytest.fixture
def retrieve(triton, model_dir: Path):
    return triton.initialize(
        model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
    )


def near(tiny, rows: list[int], seed: int) -> np.ndarray:
    """Unit queries close to the given products' vectors, so neighbours are well separated."""
    noise = np.random.default_rng(seed).normal(0, 0.3, (len(rows), DIMENSION))
    queries = tiny.embeddings[rows] + noise / np.sqrt(DIMENSION)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def top_k_input(k: int | list[int], batch: int) -> np.ndarray:
    values = [k] * batch if isinstance(k, int) else k
    return np.array(values, dtype=np.int32).reshape(-1, 1)


def assert_neighbours(triton, response, tiny, queries: np.ndarray, k: int) -> None:
    out = triton.outputs(response)
    assert set(out) == {contract.PRODUCT_IDS, contract.SCORES, contract.TITLES}
    rows, scores = tiny.exact_top_k(queries, k)
    expected_ids = np.array([[tiny.products[r].id.encode() for r in row] for row in rows])
    expected_titles = np.array([[tiny.products[r].title.encode() for r in row] for row in rows])
    for name in (contract.PRODUCT_IDS, contract.TITLES):
        # TYPE_STRING outputs: object arrays of bytes.
        assert out[name].dtype == np.object_, name
        assert out[name].shape == (len(queries), k), name
        assert all(isinstance(v, bytes) for v in out[name].flat), name
    assert out[contract.SCORES].dtype == np.float32
    assert out[contract.SCORES].shape == (len(queries), k)
    np.testing.assert_array_equal(out[contract.PRODUCT_IDS].astype(bytes), expected_ids)
    np.testing.assert_array_equal(out[contract.TITLES].astype(bytes), expected_titles)
    np.testing.assert_allclose(out[contract.SCORES], scores, rtol=0, atol=1e-5)


def test_requests_in_one_execute_get_their_own_exact_neighbours(triton, retrieve, tiny) -> None:
    q1, q2, q3 = near(tiny, [3, 7], seed=1), near(tiny, [1], seed=2), near(tiny, [0, 5, 11], seed=3)
    requests = [
        triton.request(embedding=q1, top_k=top_k_input(3, 2)),
        triton.request(embedding=q2),  # no top_k: the default
        triton.request(embedding=q3, top_k=top_k_input(5, 3)),
    ]

    responses = retrieve.execute(requests)

    assert len(responses) == 3
    assert_neighbours(triton, responses[0], tiny, q1, 3)
    assert_neighbours(triton, responses[1], tiny, q2, contract.DEFAULT_TOP_K)
    assert_neighbours(triton, responses[2], tiny, q3, 5)
    # The noise is small: each query's best match is the product it was made from.
    first = [triton.outputs(r)[contract.PRODUCT_IDS][:, 0].tolist() for r in responses]
    assert first == [[b"sku-003", b"sku-007"], [b"sku-001"], [b"sku-000", b"sku-005", b"sku-011"]]
    assert triton.outputs(responses[1])[contract.TITLES][0, 0] == "Café mug".encode()


def test_top_k_above_the_catalog_size_returns_every_product(triton, retrieve, tiny) -> None:
    queries = near(tiny, [4], seed=4)
    (response,) = retrieve.execute(
        [triton.request(embedding=queries, top_k=top_k_input(contract.MAX_TOP_K, 1))]
    )
    assert_neighbours(triton, response, tiny, queries, PRODUCTS)


@pytest.mark.parametrize(
    ("bad_inputs", "fragments"),
    [
        pytest.param({"top_k": top_k_input(0, 1)}, ["between 1 and 100", "got 0"], id="top-k-0"),
        pytest.param({"top_k": top_k_input(-3, 1)}, ["between 1 and 100", "got -3"], id="negative"),
        pytest.param(
            {"top_k": top_k_input(contract.MAX_TOP_K + 1, 1)}, ["got 101"], id="above-max"
        ),
        pytest.param(
            {"embedding": np.zeros((2, DIMENSION), np.float32), "top_k": top_k_input([2, 3], 2)},
            ["same for every query"],
            id="top-k-differs-within-request",
        ),
        pytest.param(
            {"top_k": top_k_input(2, 2)}, ["'top_k'", "shape [1, 1]"], id="top-k-wrong-rows"
        ),
        pytest.param(
            {"embedding": np.zeros((1, DIMENSION - 1), np.float32)},
            ["'embedding'", f"[batch, {DIMENSION}]", "383"],
            id="wrong-embedding-width",
        ),
        pytest.param(
            {"embedding": np.zeros(DIMENSION, np.float32)}, ["'embedding'"], id="embedding-1d"
        ),
        pytest.param({"embedding": None}, ["'embedding'", "required"], id="missing-embedding"),
    ],
)
def test_a_bad_request_gets_invalid_arg_and_its_neighbours_succeed(
    triton, retrieve, tiny, bad_inputs: dict[str, np.ndarray | None], fragments: list[str]
) -> None:
    inputs = {"embedding": near(tiny, [2], seed=5), **bad_inputs}
    good_before, good_after = near(tiny, [6, 8], seed=6), near(tiny, [9], seed=7)
    requests = [
        triton.request(embedding=good_before, top_k=top_k_input(4, 2)),
        triton.request(**{name: value for name, value in inputs.items() if value is not None}),
        triton.request(embedding=good_after, top_k=top_k_input(2, 1)),
    ]

    responses = retrieve.execute(requests)

    assert len(responses) == 3
    assert_neighbours(triton, responses[0], tiny, good_before, 4)
    triton.assert_invalid_arg(responses[1], *fragments)
    assert_neighbours(triton, responses[2], tiny, good_after, 2)


def test_missing_neighbours_are_empty_slots_not_other_products(pb_utils, triton, tiny) -> None:
    """An approximate index can return fewer than k rows (FAISS pads with -1)."""
    loaded = CatalogIndex.load(tiny.index_dir)
    exact = loaded.faiss_index

    class ShortIndex:  # finds only the two best products, then pads like FAISS
        def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores, rows = exact.search(embeddings, k)
            scores[:, 2:], rows[:, 2:] = -3.4e38, -1
            return scores, rows

    loaded.faiss_index = ShortIndex()
    queries = near(tiny, [3], seed=8)

    (response,) = RetrieveModel(pb_utils, loaded).execute(
        [triton.request(embedding=queries, top_k=top_k_input(4, 1))]
    )

    out = triton.outputs(response)
    rows, scores = tiny.exact_top_k(queries, 2)
    assert out[contract.PRODUCT_IDS].tolist() == [
        [tiny.products[rows[0, 0]].id.encode(), tiny.products[rows[0, 1]].id.encode(), b"", b""]
    ]
    assert out[contract.TITLES][0, 2:].tolist() == [b"", b""]
    np.testing.assert_allclose(out[contract.SCORES][0, :2], scores[0], atol=1e-5)
    assert np.isneginf(out[contract.SCORES][0, 2:]).all()


def test_initialize_refuses_an_index_built_for_another_encoder(triton, model_dir: Path) -> None:
    (model_dir.parent / contract.ENCODER_MODEL / "1" / "model.onnx").write_bytes(b"re-exported")
    with pytest.raises(IndexLoadError, match="build-index"):
        triton.initialize(
            model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
        )


def test_initialize_refuses_a_missing_encoder(triton, model_dir: Path) -> None:
    (model_dir.parent / contract.ENCODER_MODEL / "1" / "model.onnx").unlink()
    with pytest.raises(RuntimeError, match=r"encoder model .*model\.onnx not found"):
        triton.initialize(
            model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
        )


def test_initialize_refuses_a_missing_index(triton, model_dir: Path) -> None:
    (model_dir / "1" / "index" / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="no index"):
        triton.initialize(
            model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
        )


def test_max_top_k_parameter_is_honoured(triton, model_dir: Path, tiny) -> None:
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "100"', 'string_value: "5"'))
    model = triton.initialize(model_dir / "1" / "model.py", triton.args(config, model_dir))
    queries = near(tiny, [1], seed=9)

    responses = model.execute(
        [
            triton.request(embedding=queries),
            triton.request(embedding=queries, top_k=top_k_input(6, 1)),
        ]
    )

    # The default top_k (10) is capped at max_top_k.
    assert_neighbours(triton, responses[0], tiny, queries, 5)
    triton.assert_invalid_arg(responses[1], "between 1 and 5")


# place_on_device, with hand-written stand-ins for the faiss module.


class FakeGpuResources:
    pass


class FakeHnswIndex:
    pass


def fake_gpu_faiss(calls: list[tuple], real_faiss: ModuleType | None = None) -> ModuleType:
    """A faiss with GPU support whose index_cpu_to_gpu records its arguments. With real_faiss,
    reading indexes is real and the "GPU" index is the CPU one, so it still searches."""
    module = ModuleType("faiss")
    module.StandardGpuResources = FakeGpuResources
    module.IndexHNSWFlat = real_faiss.IndexHNSWFlat if real_faiss else FakeHnswIndex

    def index_cpu_to_gpu(resources, device, index):
        calls.append((resources, device, index))
        return index if real_faiss else ("gpu index", device)

    module.index_cpu_to_gpu = index_cpu_to_gpu
    if real_faiss:
        module.read_index = real_faiss.read_index
    return module


def test_place_on_device_leaves_cpu_instances_alone() -> None:
    calls: list[tuple] = []
    index = object()
    assert place_on_device(index, "CPU", 0, fake_gpu_faiss(calls)) == (index, None)
    assert calls == []


def test_place_on_device_uses_the_instance_gpu_not_gpu_0() -> None:
    calls: list[tuple] = []
    index = object()

    placed, resources = place_on_device(index, "GPU", 1, fake_gpu_faiss(calls))

    assert placed == ("gpu index", 1)
    assert isinstance(resources, FakeGpuResources)
    assert calls == [(resources, 1, index)]


def test_place_on_device_keeps_hnsw_on_the_cpu() -> None:
    calls: list[tuple] = []
    index = FakeHnswIndex()
    assert place_on_device(index, "GPU", 1, fake_gpu_faiss(calls)) == (index, None)
    assert calls == []


def test_place_on_device_refuses_gpu_without_faiss_gpu() -> None:
    cpu_only_faiss = ModuleType("faiss")
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        place_on_device(object(), "GPU", 1, cpu_only_faiss)


def test_gpu_profile_instance_moves_the_index_to_its_own_device(
    triton, monkeypatch: pytest.MonkeyPatch, model_dir: Path, tiny
) -> None:
    import faiss

    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "faiss", fake_gpu_faiss(calls, real_faiss=faiss))
    args = triton.args(
        model_dir / "configs" / "gpu.pbtxt", model_dir, instance_kind="GPU", device_id=1
    )

    model = triton.initialize(model_dir / "1" / "model.py", args)

    ((resources, device, _),) = calls
    assert device == 1
    # The resources must live as long as the index: the model keeps them.
    assert model.model.index.gpu_resources is resources
    queries = near(tiny, [10], seed=10)
    (response,) = model.execute([triton.request(embedding=queries, top_k=top_k_input(3, 1))])
    assert_neighbours(triton, response, tiny, queries, 3)
    assert any("GPU 1" in message for message in triton.logged("INFO"))


def test_gpu_profile_without_faiss_gpu_fails_initialize(
    triton, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    import faiss

    cpu_only_faiss = ModuleType("faiss")
    cpu_only_faiss.read_index = faiss.read_index
    monkeypatch.setitem(sys.modules, "faiss", cpu_only_faiss)
    args = triton.args(
        model_dir / "configs" / "gpu.pbtxt", model_dir, instance_kind="GPU", device_id=1
    )
    with pytest.raises(RuntimeError, match=r"KIND_GPU.*faiss-gpu"):
        triton.initialize(model_dir / "1" / "model.py", args)


def test_an_index_of_another_dimension_than_the_config_fails_initialize(
    triton, tmp_path: Path, tiny_index_factory
) -> None:
    encoder = tmp_path / contract.ENCODER_MODEL / "1" / "model.onnx"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(ENCODER_BYTES)
    model_dir = triton.copy_model_dir(contract.RETRIEVE_MODEL, tmp_path)
    tiny_index_factory(
        model_dir / "1" / "index", hashlib.sha256(ENCODER_BYTES).hexdigest(), dimension=8
    )
    with pytest.raises(IndexLoadError, match="dimension 8"):
        triton.initialize(
            model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
        )
