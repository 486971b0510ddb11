"""model_repository/retrieve/1/model.py driven through the fake backend module, over a tiny
exact index whose vector neighbours are computed here with numpy and whose BM25 matches are the
titles holding a query word."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.catalog import Product
from ecomsearch.index.manifest import LEXICAL_DIR, IndexLoadError
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.ranking.candidates import LEXICAL_POOL, VECTOR_POOL, HybridRetriever
from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES
from ecomsearch.serving.retrieve import RetrieveModel, place_on_device

# Small pools, written into a copy of the config, so the vector list does not already hold the
# whole tiny catalog and lexical-only candidates and padding both occur.
SMALL_VECTOR_POOL = 3
SMALL_LEXICAL_POOL = 4
COSINE = FEATURE_NAMES.index("cosine")
FUSED = FEATURE_NAMES.index("fused_score")
CANDIDATE_OUTPUTS = {
    contract.CANDIDATE_ROWS,
    contract.CANDIDATE_FEATURES,
    contract.RETRIEVAL_SCORES,
}


@pytest.fixture
def repo(tiny_repository_factory):
    return tiny_repository_factory()


@pytest.fixture
def tiny(repo):
    return repo.index


@pytest.fixture
def model_dir(repo) -> Path:
    return repo.retrieve_dir


def initialize(triton, model_dir: Path):
    """TritonPythonModel.initialize with the model directory's config.pbtxt."""
    args = triton.args(model_dir / "config.pbtxt", model_dir)
    return triton.initialize(model_dir / "1" / "model.py", args)


@pytest.fixture
def retrieve(triton, model_dir: Path):
    """The model with the checked-in config."""
    return initialize(triton, model_dir)


@pytest.fixture
def small_retrieve(triton, model_dir: Path):
    """The model with SMALL_VECTOR_POOL and SMALL_LEXICAL_POOL."""
    triton.set_parameters(
        model_dir / "config.pbtxt",
        vector_pool=SMALL_VECTOR_POOL,
        lexical_pool=SMALL_LEXICAL_POOL,
    )
    return initialize(triton, model_dir)


def near(tiny, rows: list[int], seed: int) -> np.ndarray:
    """Unit queries close to the given products' vectors, so neighbours are well separated."""
    dimension = tiny.embeddings.shape[1]
    noise = np.random.default_rng(seed).normal(0, 0.3, (len(rows), dimension))
    queries = tiny.embeddings[rows] + noise / np.sqrt(dimension)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def texts(values: Sequence[bytes | str]) -> np.ndarray:
    """A [batch, 1] BYTES input as the backend hands it over: an object array of bytes."""
    array = np.empty((len(values), 1), dtype=object)
    array[:, 0] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    return array


def title_matches(tiny, query: str) -> set[int]:
    """Rows whose title has one of the query's words, by plain string splitting."""
    words = set(query.lower().split())
    return {i for i, p in enumerate(tiny.products) if words & set(p.title.lower().split())}


def assert_candidates(
    triton, response, tiny, queries: list[str], embeddings: np.ndarray, pools: tuple[int, int]
) -> None:
    """Per query: the exact vector top-N first, best first; then every BM25 title match not
    already there; then padding (-1, zero features, -inf). Cosines are the true dot products and
    the retrieval score is the fused_score feature."""
    vector_pool, lexical_pool = pools
    width = vector_pool + lexical_pool
    out = triton.outputs(response)
    assert set(out) == CANDIDATE_OUTPUTS
    rows = out[contract.CANDIDATE_ROWS]
    features = out[contract.CANDIDATE_FEATURES]
    scores = out[contract.RETRIEVAL_SCORES]
    batch = len(queries)
    assert rows.dtype == np.int64 and rows.shape == (batch, width)
    assert features.dtype == np.float32 and features.shape == (batch, width, FEATURE_COUNT)
    assert scores.dtype == np.float32 and scores.shape == (batch, width)

    found = min(vector_pool, len(tiny.products))
    vector_rows, _ = tiny.exact_top_k(embeddings, found)
    for i, query in enumerate(queries):
        matches = title_matches(tiny, query)
        assert len(matches) <= lexical_pool, "test setup: every match must fit the pool"
        lexical_only = matches - set(vector_rows[i].tolist())
        real = found + len(lexical_only)
        assert rows[i, :found].tolist() == vector_rows[i].tolist(), query
        assert set(rows[i, found:real].tolist()) == lexical_only, query
        assert (rows[i, real:] == -1).all(), query
        assert not features[i, real:].any(), query
        assert np.isneginf(scores[i, real:]).all(), query

        expected_cosine = tiny.embeddings[rows[i, :real]] @ embeddings[i]
        np.testing.assert_allclose(features[i, :real, COSINE], expected_cosine, atol=1e-5)
        np.testing.assert_array_equal(scores[i, :real], features[i, :real, FUSED])
        assert np.isfinite(features[i, :real]).all(), query


def test_requests_in_one_execute_get_their_own_candidates(triton, small_retrieve, tiny) -> None:
    batches = [
        (["cordless drill", "café mug"], near(tiny, [5, 1], seed=1)),
        (["hammer"], near(tiny, [7], seed=2)),
        (["garden hose", "zzzz unknown words", "drill"], near(tiny, [3, 9, 2], seed=3)),
    ]
    requests = [triton.request(query=texts(q), embedding=e) for q, e in batches]

    responses = small_retrieve.execute(requests)

    assert len(responses) == len(batches)
    for response, (queries, embeddings) in zip(responses, batches, strict=True):
        assert_candidates(
            triton, response, tiny, queries, embeddings, (SMALL_VECTOR_POOL, SMALL_LEXICAL_POOL)
        )
    # The noise is small: each query's best vector match is the product it was made from.
    first = [triton.outputs(r)[contract.CANDIDATE_ROWS][:, 0].tolist() for r in responses]
    assert first == [[5, 1], [7], [3, 9, 2]]


def test_a_word_in_some_titles_brings_exactly_those_products(triton, small_retrieve, tiny) -> None:
    # Vector neighbours of an unrelated product; "cordless drill" is in four titles, all of
    # which must come from BM25 unless the vector list already has them.
    embedding = near(tiny, [8], seed=4)
    assert title_matches(tiny, "cordless drill") == {0, 2, 10, 11}

    (response,) = small_retrieve.execute(
        [triton.request(query=texts(["Cordless DRILL"]), embedding=embedding)]
    )

    rows = triton.outputs(response)[contract.CANDIDATE_ROWS][0]
    assert {0, 2, 10, 11} <= set(rows.tolist())
    # Products without either word are candidates only as vector neighbours.
    assert set(rows[SMALL_VECTOR_POOL:].tolist()) <= {0, 2, 10, 11, -1}
    assert_candidates(
        triton,
        response,
        tiny,
        ["cordless drill"],
        embedding,
        (SMALL_VECTOR_POOL, SMALL_LEXICAL_POOL),
    )


def test_candidate_width_comes_from_the_config_pools(triton, retrieve, model_dir, tiny) -> None:
    config = model_dir / "config.pbtxt"
    pools = (
        int(triton.config_parameter(config, "vector_pool", str(VECTOR_POOL))),
        int(triton.config_parameter(config, "lexical_pool", str(LEXICAL_POOL))),
    )
    embeddings = near(tiny, [4, 6], seed=5)

    (response,) = retrieve.execute(
        [triton.request(query=texts(["lawn mower", "claw hammer"]), embedding=embeddings)]
    )

    assert_candidates(triton, response, tiny, ["lawn mower", "claw hammer"], embeddings, pools)


def test_faiss_padding_never_becomes_a_candidate(pb_utils, triton, tiny) -> None:
    """An approximate index can return fewer than k rows; FAISS pads with -1, which must not be
    read as the last product."""
    loaded = CatalogIndex.load(tiny.index_dir)
    exact = loaded.faiss_index

    class ShortIndex:  # finds only the two best products, then pads like FAISS
        ntotal, d = exact.ntotal, exact.d

        def search(self, embeddings: np.ndarray, k: int, params=None):
            scores, rows = exact.search(embeddings, k, params=params)
            scores[:, 2:], rows[:, 2:] = -3.4e38, -1
            return scores, rows

        def reconstruct_n(self, start: int, count: int) -> np.ndarray:
            return exact.reconstruct_n(start, count)

    loaded.faiss_index = ShortIndex()
    retriever = HybridRetriever(LiveCatalog.load(loaded), vector_pool=5, lexical_pool=2)
    embedding = near(tiny, [3], seed=6)

    (response,) = RetrieveModel(pb_utils, retriever).execute(
        [triton.request(query=texts(["no such word"]), embedding=embedding)]
    )

    out = triton.outputs(response)
    best_two, _ = tiny.exact_top_k(embedding, 2)
    assert out[contract.CANDIDATE_ROWS].tolist() == [[*best_two[0].tolist(), -1, -1, -1, -1, -1]]
    assert np.isneginf(out[contract.RETRIEVAL_SCORES][0, 2:]).all()


# Bad requests. Each is sent between two good ones, which must still get their candidates.


# case -> (embedding width -> (inputs replacing the good ones, fragments of the message)).
BAD_REQUESTS = {
    "wrong-embedding-width": lambda d: (
        {"embedding": np.zeros((1, d - 1), np.float32)},
        ["'embedding'", f"[batch, {d}]", str(d - 1)],
    ),
    "embedding-1d": lambda d: ({"embedding": np.zeros(d, np.float32)}, ["'embedding'"]),
    "missing-embedding": lambda d: ({"embedding": None}, ["'embedding'", "required"]),
    "missing-query": lambda d: ({"query": None}, ["'query'", "required"]),
    "invalid-utf8": lambda d: ({"query": texts([b"caf\xe9 mug"])}, ["query 0", "not valid UTF-8"]),
    "blank-query": lambda d: ({"query": texts(["  \t "])}, ["query 0", "empty"]),
    "invisible-query": lambda d: ({"query": texts(["\u200b\x00\ufeff"])}, ["query 0", "empty"]),
    "embedding-nan": lambda d: (
        {"embedding": np.full((1, d), np.nan, np.float32)},
        ["'embedding'", "finite"],
    ),
    "embedding-infinite": lambda d: (
        {"embedding": np.full((1, d), np.inf, np.float32)},
        ["'embedding'", "finite"],
    ),
    "query-1d": lambda d: (
        {"query": np.array([b"garden hose"], dtype=object)},
        ["'query'", "shape [batch, 1]"],
    ),
    "more-queries-than-embeddings": lambda d: (
        {"query": texts(["garden hose", "hammer"])},
        ["2 queries but 1 embeddings"],
    ),
    "more-embeddings-than-queries": lambda d: (
        {"embedding": np.zeros((2, d), np.float32)},
        ["1 queries but 2 embeddings"],
    ),
    "filter-wrong-rows": lambda d: (
        {"brand": texts(["acme", "acme"])},
        ["'brand'", "shape [1, 1]"],
    ),
    "filter-invalid-utf8": lambda d: (
        {"category": texts([b"caf\xe9"])},
        ["'category'", "UTF-8"],
    ),
    "filter-invisible": lambda d: ({"brand": texts(["\u200b"])}, ["'brand'", "no visible text"]),
    "filter-too-long": lambda d: (
        {"category": texts(["x" * (contract.MAX_FILTER_BYTES + 1)])},
        ["'category'", f"longer than {contract.MAX_FILTER_BYTES} bytes"],
    ),
    "filter-negative-price": lambda d: (
        {"min_price": np.array([[-1.0]], np.float32)},
        ["'min_price'", "finite price >= 0"],
    ),
    "filter-infinite-price": lambda d: (
        {"max_price": np.array([[np.inf]], np.float32)},
        ["'max_price'", "finite price >= 0"],
    ),
    "filter-min-above-max": lambda d: (
        {
            "min_price": np.array([[20.0]], np.float32),
            "max_price": np.array([[10.0]], np.float32),
        },
        ["'min_price' 20.0 exceeds the maximum 10.0"],
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_invalid_arg_and_its_neighbours_succeed(
    triton, small_retrieve, tiny, case: str
) -> None:
    bad_inputs, fragments = BAD_REQUESTS[case](tiny.manifest.dimension)
    inputs = {"query": texts(["garden hose"]), "embedding": near(tiny, [2], seed=7), **bad_inputs}
    before = (["wood screw", "paint roller"], near(tiny, [6, 8], seed=8))
    after = (["extension cord"], near(tiny, [9], seed=9))
    requests = [
        triton.request(query=texts(before[0]), embedding=before[1]),
        triton.request(**{name: value for name, value in inputs.items() if value is not None}),
        triton.request(query=texts(after[0]), embedding=after[1]),
    ]

    responses = small_retrieve.execute(requests)

    assert len(responses) == 3
    pools = (SMALL_VECTOR_POOL, SMALL_LEXICAL_POOL)
    assert_candidates(triton, responses[0], tiny, *before, pools)
    triton.assert_invalid_arg(responses[1], *fragments)
    assert_candidates(triton, responses[2], tiny, *after, pools)


# initialize refuses broken or mismatched artefacts, with a message naming the problem.


def test_initialize_refuses_an_index_built_for_another_encoder(triton, repo) -> None:
    repo.layout.encoder_onnx.write_bytes(b"re-exported")
    with pytest.raises(IndexLoadError, match="build-index"):
        initialize(triton, repo.retrieve_dir)


def test_initialize_refuses_a_missing_encoder(triton, repo) -> None:
    repo.layout.encoder_onnx.unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder .*model\.onnx not found"):
        initialize(triton, repo.retrieve_dir)


def test_initialize_refuses_a_missing_index(triton, repo) -> None:
    (repo.layout.index_dir / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="no index"):
        initialize(triton, repo.retrieve_dir)


def test_initialize_refuses_an_index_without_its_lexical_fields(triton, repo) -> None:
    lexical_file = next(
        p for p in sorted((repo.layout.index_dir / LEXICAL_DIR).rglob("*")) if p.is_file()
    )
    lexical_file.unlink()
    name = str(lexical_file.relative_to(repo.layout.index_dir))
    with pytest.raises(IndexLoadError, match=f"{name} missing"):
        initialize(triton, repo.retrieve_dir)


def test_an_index_of_another_dimension_than_the_config_fails_initialize(
    triton, tiny_repository_factory
) -> None:
    repo = tiny_repository_factory(dimension=8)
    with pytest.raises(IndexLoadError, match="dimension 8"):
        initialize(triton, repo.retrieve_dir)


def test_initialize_refuses_a_missing_ranker_info(triton, repo) -> None:
    repo.layout.ranker_info.unlink()
    with pytest.raises(RuntimeError, match=r"ranker\.json not found"):
        initialize(triton, repo.retrieve_dir)


@pytest.mark.parametrize(
    "feature_names",
    [
        list(FEATURE_NAMES[:-1]),
        [*FEATURE_NAMES, "price"],
        list(reversed(FEATURE_NAMES)),
    ],
    ids=["one-fewer", "one-more", "reordered"],
)
def test_initialize_refuses_a_ranker_trained_on_other_features(
    triton, repo, feature_names: list[str]
) -> None:
    repo.layout.ranker_info.write_text(json.dumps({"feature_names": feature_names}))
    with pytest.raises(RuntimeError, match="retrain") as raised:
        initialize(triton, repo.retrieve_dir)
    assert str(repo.layout.ranker_info.name) in str(raised.value)


def test_initialize_refuses_a_corrupt_ranker_info_naming_it(triton, repo) -> None:
    repo.layout.ranker_info.write_text('{"feature_names": [')
    with pytest.raises(RuntimeError, match=r"ranker\.json"):
        initialize(triton, repo.retrieve_dir)


@pytest.mark.parametrize("key", ["vector_pool", "lexical_pool"])
@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_pool_parameter_fails_initialize(triton, repo, key: str, value: str) -> None:
    triton.set_parameters(repo.retrieve_dir / "config.pbtxt", **{key: value})
    with pytest.raises(ValueError, match=key):
        initialize(triton, repo.retrieve_dir)


# place_on_device, with hand-written stand-ins for the faiss module.


class FakeGpuResources:
    pass


class FakeHnswIndex:
    pass


class FakeGpuFlatIndex:
    """What index_cpu_to_gpu makes of a flat index, searching with the CPU one: no IndexFlat
    (its vectors are not in host memory), and, like faiss's GpuIndexFlat, it ignores search
    parameters, an ID selector included (faiss issues 3114 and 3924)."""

    def __init__(self, cpu_index) -> None:
        self.cpu_index = cpu_index
        self.ntotal, self.d = cpu_index.ntotal, cpu_index.d

    def search(self, embeddings: np.ndarray, k: int, params=None):
        return self.cpu_index.search(embeddings, k)

    def reconstruct_n(self, start: int, count: int) -> np.ndarray:
        return self.cpu_index.reconstruct_n(start, count)


def fake_gpu_faiss(calls: list[tuple], real_faiss: ModuleType | None = None) -> ModuleType:
    """A faiss with GPU support whose index_cpu_to_gpu records its arguments. With real_faiss,
    the rest of the module is the real one and the "GPU" index a FakeGpuFlatIndex, so it still
    searches."""
    module = ModuleType("faiss")
    if real_faiss:
        module.__dict__.update(
            {k: v for k, v in vars(real_faiss).items() if not k.startswith("__")}
        )
    module.StandardGpuResources = FakeGpuResources
    module.IndexHNSWFlat = real_faiss.IndexHNSWFlat if real_faiss else FakeHnswIndex

    def index_cpu_to_gpu(resources, device, index):
        calls.append((resources, device, index))
        return FakeGpuFlatIndex(index) if real_faiss else ("gpu index", device)

    module.index_cpu_to_gpu = index_cpu_to_gpu
    module.omp_threads = []
    module.omp_set_num_threads = module.omp_threads.append
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


def test_place_on_device_shares_the_resources_of_the_index_it_replaces() -> None:
    """A compaction switches the base index: its successor must not reserve device memory
    anew (each StandardGpuResources keeps its own scratch memory)."""
    calls: list[tuple] = []
    fake = fake_gpu_faiss(calls)
    first, second = object(), object()
    _, resources = place_on_device(first, "GPU", 1, fake)

    placed, shared = place_on_device(second, "GPU", 1, fake, resources)

    assert shared is resources and placed == ("gpu index", 1)
    assert calls == [(resources, 1, first), (resources, 1, second)]


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
    config = model_dir / "configs" / "gpu.pbtxt"
    pools = (
        int(triton.config_parameter(config, "vector_pool", str(VECTOR_POOL))),
        int(triton.config_parameter(config, "lexical_pool", str(LEXICAL_POOL))),
    )
    args = triton.args(config, model_dir, instance_kind="GPU", device_id=1)

    model = triton.initialize(model_dir / "1" / "model.py", args)

    ((resources, device, _),) = calls
    assert device == 1
    # The resources must live as long as the index: the model keeps them.
    assert model.model.gpu_resources is resources
    embeddings = near(tiny, [10], seed=10)
    (response,) = model.execute(
        [triton.request(query=texts(["leaf blower"]), embedding=embeddings)]
    )
    assert_candidates(triton, response, tiny, ["leaf blower"], embeddings, pools)
    assert any("GPU 1" in message for message in triton.logged("INFO"))


def test_gpu_profile_filters_are_exact_although_gpu_indexes_ignore_id_selectors(
    triton, monkeypatch: pytest.MonkeyPatch, tiny_repository_factory
) -> None:
    import faiss

    titles = ["Cordless drill", "Garden hose", "Claw hammer", "Drill bit set", "Hose reel"]
    products = [
        Product(id=f"sku-{i}", title=titles[i % len(titles)], price=10.0 * i) for i in range(12)
    ]
    repo = tiny_repository_factory(products=products)
    tiny, model_dir = repo.index, repo.retrieve_dir
    monkeypatch.setitem(sys.modules, "faiss", fake_gpu_faiss([], real_faiss=faiss))
    config = model_dir / "configs" / "gpu.pbtxt"
    triton.set_parameters(config, vector_pool=SMALL_VECTOR_POOL, lexical_pool=SMALL_LEXICAL_POOL)
    model = triton.initialize(
        model_dir / "1" / "model.py",
        triton.args(config, model_dir, instance_kind="GPU", device_id=1),
    )
    passing = [0, 1, 2, 3, 4]  # priced at most 40
    # Queries near products the filter rejects: unfiltered, those would be the best matches.
    embeddings = near(tiny, [9, 10], seed=12)

    (response,) = model.execute(
        [
            triton.request(
                query=texts(["drill", "hose"]),
                embedding=embeddings,
                max_price=np.full((2, 1), 40.0, np.float32),
            )
        ]
    )

    rows = triton.outputs(response)[contract.CANDIDATE_ROWS]
    scores = embeddings @ tiny.embeddings[passing].T
    for i, query in enumerate(["drill", "hose"]):
        best = [passing[j] for j in np.argsort(-scores[i], kind="stable")[:SMALL_VECTOR_POOL]]
        assert rows[i, :SMALL_VECTOR_POOL].tolist() == best, query
        assert set(rows[i][rows[i] >= 0].tolist()) <= set(passing), query


@pytest.mark.parametrize("value", [None, "3"], ids=["checked-in", "three"])
def test_faiss_threads_come_from_the_config(
    triton, monkeypatch: pytest.MonkeyPatch, model_dir: Path, value: str | None
) -> None:
    import faiss

    fake = fake_gpu_faiss([], real_faiss=faiss)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    config = model_dir / "config.pbtxt"
    if value is not None:
        triton.set_parameters(config, faiss_omp_threads=value)
    threads = int(triton.config_parameter(config, "faiss_omp_threads", "1"))

    initialize(triton, model_dir)

    assert fake.omp_threads == [threads]


def test_gpu_profile_without_faiss_gpu_fails_initialize(
    triton, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    import faiss

    cpu_only_faiss = ModuleType("faiss")
    cpu_only_faiss.read_index = faiss.read_index
    cpu_only_faiss.omp_set_num_threads = faiss.omp_set_num_threads
    monkeypatch.setitem(sys.modules, "faiss", cpu_only_faiss)
    args = triton.args(
        model_dir / "configs" / "gpu.pbtxt", model_dir, instance_kind="GPU", device_id=1
    )
    with pytest.raises(RuntimeError, match=r"KIND_GPU.*faiss-gpu"):
        triton.initialize(model_dir / "1" / "model.py", args)


def test_the_encoder_and_ranker_are_the_latest_versions_not_version_1(triton, repo) -> None:
    """The ensembles run each model's latest version; retrieve checks its index against that
    encoder, and the ranker's features against that ranker, wherever they are."""
    layout = repo.layout
    served = layout.encoder_onnx.read_bytes()
    newer = layout.model_dir(contract.ENCODER_MODEL) / "2" / "model.onnx"
    newer.parent.mkdir()
    newer.write_bytes(b"a newer encoder")
    assert layout.encoder_onnx == newer
    with pytest.raises(IndexLoadError, match="build-index"):
        initialize(triton, repo.retrieve_dir)

    newer.write_bytes(served)
    (layout.model_dir(contract.ENCODER_MODEL) / "1" / "model.onnx").write_bytes(b"an older one")
    ranker = layout.model_dir(contract.RANKER_MODEL) / "7" / "ranker.json"
    ranker.parent.mkdir()
    ranker.write_text(json.dumps({"feature_names": ["an", "older", "set"]}))
    with pytest.raises(RuntimeError, match="retrain"):
        initialize(triton, repo.retrieve_dir)
    ranker.write_text(
        layout.version_dir(contract.RANKER_MODEL, 1).joinpath("ranker.json").read_text()
    )
    catalog = initialize(triton, repo.retrieve_dir).model.retriever.catalog
    assert catalog.base_count == catalog.live_count == len(repo.index.products)


def test_settings_come_from_the_config_with_the_code_defaults() -> None:
    from ecomsearch.serving.retrieve import RetrieveSettings

    assert RetrieveSettings.from_config({}) == RetrieveSettings()
    config = {"parameters": {"vector_pool": {"string_value": "7"}}}
    assert RetrieveSettings.from_config(config) == RetrieveSettings(vector_pool=7)
    with pytest.raises(ValueError, match="'lexical_pool' must be >= 1"):
        RetrieveSettings.from_config({"parameters": {"lexical_pool": {"string_value": "0"}}})


# Filters, through the model.

PRICED_TITLES = ["Cordless drill", "Garden hose", "Claw hammer", "Drill bit set", "Hose reel"]


def priced_catalog(count: int = 12) -> list[Product]:
    """Products priced 0, 9.99, 19.98, ... (decimals FP32 cannot hold), every third out of
    stock, brands Acme and Bosch, categories Tools > Drills and Garden."""
    return [
        Product(
            id=f"sku-{i}",
            title=PRICED_TITLES[i % len(PRICED_TITLES)],
            brand=["Acme", "Bosch"][i % 2],
            category=["Tools > Drills", "Garden"][i % 4 == 3],
            price=round(9.99 * i, 2),
            in_stock=i % 3 != 2,
        )
        for i in range(count)
    ]


def filter_inputs(batch: int, **values) -> dict[str, np.ndarray]:
    """The optional filter inputs as a client sends them: [batch, 1], prices as FP32."""
    inputs = {}
    for name, value in values.items():
        if name in (contract.FILTER_CATEGORY, contract.FILTER_BRAND):
            inputs[name] = texts([value] * batch)
        elif name == contract.FILTER_IN_STOCK:
            inputs[name] = np.full((batch, 1), value, dtype=bool)
        else:
            inputs[name] = np.full((batch, 1), value, dtype=np.float32)
    return inputs


@pytest.mark.parametrize(
    ("values", "passing"),
    [
        ({"max_price": 29.97}, {0, 1, 2, 3}),  # 29.97 as FP32 is below 29.97: still passes it
        ({"min_price": 9.99, "max_price": 19.98}, {1, 2}),
        ({"brand": "ACME", "in_stock_only": True}, {0, 4, 6, 10}),
        ({"category": "tools > DRILLS", "brand": "bosch"}, {1, 5, 9}),
        ({"category": "Garden", "max_price": math.nan}, {3, 7, 11}),
        ({"brand": "nobody"}, set()),
    ],
)
def test_filtered_candidates_are_the_passing_products_only(
    triton, tiny_repository_factory, values: dict, passing: set[int]
) -> None:
    repo = tiny_repository_factory(products=priced_catalog())
    tiny, model_dir = repo.index, repo.retrieve_dir
    triton.set_parameters(
        model_dir / "config.pbtxt", vector_pool=SMALL_VECTOR_POOL, lexical_pool=SMALL_LEXICAL_POOL
    )
    model = initialize(triton, model_dir)
    embeddings = near(tiny, [8, 3], seed=13)
    queries = ["cordless drill", "hose"]

    (response,) = model.execute(
        [triton.request(query=texts(queries), embedding=embeddings, **filter_inputs(2, **values))]
    )

    rows = triton.outputs(response)[contract.CANDIDATE_ROWS]
    ordered = sorted(passing)
    for i, query in enumerate(queries):
        found = min(SMALL_VECTOR_POOL, len(passing))
        scores = embeddings[i] @ tiny.embeddings[ordered].T if ordered else np.zeros(0)
        best = [ordered[j] for j in np.argsort(-scores, kind="stable")[:found]]
        assert rows[i, :found].tolist() == best, query
        real = rows[i][rows[i] >= 0].tolist()
        assert set(real) <= passing and len(real) == len(set(real)), query
        words = set(query.split())
        title_matches = {j for j in passing if words & set(tiny.products[j].title.lower().split())}
        assert title_matches - set(best) <= set(real[found:]), "every passing BM25 match"


def test_each_query_of_a_request_has_its_own_filter(triton, tiny_repository_factory) -> None:
    repo = tiny_repository_factory(products=priced_catalog())
    model = initialize(triton, repo.retrieve_dir)
    embeddings = near(repo.index, [0, 0, 0], seed=14)
    # Empty strings, NaN and False: the values that mean "no filter" for one query.
    inputs = {
        contract.FILTER_BRAND: texts(["acme", "", "bosch"]),
        contract.FILTER_MAX_PRICE: np.array([[math.nan], [9.99], [math.nan]], np.float32),
        contract.FILTER_IN_STOCK: np.array([[False], [False], [True]]),
    }

    (response,) = model.execute(
        [triton.request(query=texts(["drill"] * 3), embedding=embeddings, **inputs)]
    )

    rows = triton.outputs(response)[contract.CANDIDATE_ROWS]
    real = [set(r[r >= 0].tolist()) for r in rows]
    products = repo.index.products
    assert real[0] == {i for i, p in enumerate(products) if p.brand == "Acme"}
    assert real[1] == {0, 1}
    assert real[2] == {i for i, p in enumerate(products) if p.brand == "Bosch" and p.in_stock}


# A live catalog: the index was built from a catalog store, which retrieve follows.


class LiveRetrieve:
    """retrieve over a SQLite catalog store holding priced_catalog(); candidates are store
    keys, keys[i] being product i's."""

    def __init__(self, triton, repo, store_path: Path, **parameters) -> None:
        from ecomsearch.index.builder import store_snapshot, write_index
        from ecomsearch.store import open_store, product_write

        self.triton, self.repo, self.index = triton, repo, repo.index
        self.store = open_store(store_path)
        written = self.store.upsert(
            [product_write(p) for p in self.index.products],
            self.index.embeddings,
            repo.encoder_fingerprint,
        )
        self.keys = list(written.keys)
        write_index(repo.layout.index_dir, store_snapshot(self.store, "catalog"))
        config = repo.retrieve_dir / "config.pbtxt"
        triton.set_parameters(config, catalog_poll_interval_ms=5, **parameters)
        self.model = initialize(triton, repo.retrieve_dir)

    def upsert(self, product: Product, embedding: np.ndarray) -> int:
        from ecomsearch.store import product_write

        written = self.store.upsert(
            [product_write(product)], embedding.reshape(1, -1), self.repo.encoder_fingerprint
        )
        return written.keys[0]

    def candidates(self, query: str, embedding: np.ndarray, **filters) -> list[int]:
        (response,) = self.model.execute(
            [
                self.triton.request(
                    query=texts([query]),
                    embedding=embedding.reshape(1, -1),
                    **filter_inputs(1, **filters),
                )
            ]
        )
        rows = self.triton.outputs(response)[contract.CANDIDATE_ROWS][0]
        return rows[rows >= 0].tolist()

    def eventually(self, condition, timeout_s: float = 10.0) -> None:
        """Searches until `condition()` holds: the follower applies what it read, and a new
        base is swapped in, when a search runs."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "retrieve did not follow the store in time"
            time.sleep(0.01)


@pytest.fixture
def live_retrieve(triton, tiny_repository_factory, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """LiveRetrieve(**parameters); every model made is finalized after the test."""
    from ecomsearch.live.location import STORE_URL_ENV

    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    made: list[LiveRetrieve] = []

    def make(**parameters) -> LiveRetrieve:
        repo = tiny_repository_factory(products=priced_catalog())
        made.append(LiveRetrieve(triton, repo, tmp_path / "catalog.sqlite3", **parameters))
        return made[-1]

    yield make
    for live in made:
        live.model.finalize()
        live.store.close()


def test_a_live_catalog_gives_store_keys_and_follows_writes(live_retrieve) -> None:
    live = live_retrieve()
    index, keys = live.index, live.keys
    query = near(index, [4], seed=15)[0]
    assert keys != list(range(len(keys))), "test setup: keys must not be the rows"
    assert live.candidates("hose", query)[0] == keys[4]

    # A new product right where the query points, out of stock.
    new = Product(id="sku-new", title="Zircon hose", brand="Acme", price=1.0, in_stock=False)
    new_key = live.upsert(new, query)
    live.eventually(lambda: live.candidates("hose", query)[0] == new_key)
    assert new_key not in live.candidates("hose", query, in_stock_only=True)
    assert live.candidates("zircon", query, brand="acme", min_price=0.5, max_price=1) == [new_key]

    # Now in stock, and then gone.
    live.upsert(replace(new, in_stock=True), query)
    live.eventually(lambda: live.candidates("hose", query, in_stock_only=True)[0] == new_key)
    live.store.delete(["sku-new"])
    live.eventually(lambda: new_key not in live.candidates("zircon hose", query))
    assert live.candidates("hose", query)[0] == keys[4]


def test_an_index_from_another_store_refuses_to_serve(
    triton, live_retrieve, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomsearch.live.location import STORE_URL_ENV
    from ecomsearch.store import open_store

    live = live_retrieve()
    with open_store(tmp_path / "other.sqlite3") as other:
        monkeypatch.setenv(STORE_URL_ENV, other.url)
        with pytest.raises(RuntimeError, match=r"another store.*build-index"):
            initialize(triton, live.repo.retrieve_dir)


def test_a_static_index_is_served_as_built_with_a_warning(triton, retrieve) -> None:
    assert retrieve.model.live is None
    assert any("without a catalog store" in message for message in triton.logged("WARNING"))


def test_past_the_threshold_the_catalog_is_compacted_and_the_new_base_served(
    live_retrieve, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomsearch.live import served

    monkeypatch.setattr(served, "VERSION_CHECK_INTERVAL_S", 0.01)
    live = live_retrieve(compact_delta_rows=2)
    retriever = live.model.model.retriever
    first = retriever.catalog.version_dir
    query = near(live.index, [2], seed=16)[0]
    keys = [
        live.upsert(Product(id=f"sku-new-{n}", title="Zircon drill", price=5.0), query)
        for n in range(2)
    ]

    live.eventually(
        lambda: (
            set(live.candidates("drill", query)[:2]) == set(keys)
            and retriever.catalog.version_dir != first
        )
    )

    catalog = retriever.catalog
    assert catalog.delta_rows == 0 and catalog.base_count == len(live.keys) + 2
    assert catalog.base.manifest.catalog_seq == live.store.head()


def test_a_batch_publishes_its_queries_candidates_by_source_and_gauges(
    triton, small_retrieve, tiny
) -> None:
    from ecomsearch.serving import metrics

    family = triton.pb_utils.MetricFamily.registry
    instance = {"model": "retrieve", "version": "1", "model_instance": "retrieve_0_0"}
    assert family[metrics.INDEX_PRODUCTS.name].value(**instance) == len(tiny.products)
    embedding = near(tiny, [8, 3], seed=4)

    (response,) = small_retrieve.execute(
        [triton.request(query=texts(["cordless drill", "zzzz"]), embedding=embedding)]
    )

    assert family[metrics.QUERIES.name].value(**instance) == 0, "sent within a second, not now"
    small_retrieve.model.metrics.flush()  # what the sender thread does once a second
    out = triton.outputs(response)
    rows, features = out[contract.CANDIDATE_ROWS], out[contract.CANDIDATE_FEATURES]
    lexical = {0, 2, 10, 11}  # the titles with "cordless" or "drill"; "zzzz" matches none
    assert family[metrics.QUERIES.name].value(**instance) == 2
    assert family[metrics.CANDIDATES.name].value(**instance, source="vector") == (
        2 * SMALL_VECTOR_POOL
    )
    assert family[metrics.CANDIDATES.name].value(**instance, source="lexical") == len(lexical)
    assert family[metrics.EMPTY_RESULTS.name].value(**instance) == 0, "both had candidates"
    rejected = family[metrics.REQUESTS_REJECTED.name]
    assert {dict(key)["reason"] for key in rejected.metrics} == {"invalid_argument", "internal"}
    assert sum(m.value() for m in rejected.metrics.values()) == 0
    assert (rows >= 0).sum() == len(set(rows[0].tolist()) - {-1}) + SMALL_VECTOR_POOL
    assert features.shape[:2] == rows.shape
