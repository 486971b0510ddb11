"""model_repository/retrieve/1/model.py driven through the fake backend module, over a tiny
exact index whose vector neighbours are computed here with numpy and whose BM25 matches are the
titles holding a query word."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.index.manifest import LEXICAL_DIR, IndexLoadError
from ecomsearch.index.store import CatalogIndex
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
        def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores, rows = exact.search(embeddings, k)
            scores[:, 2:], rows[:, 2:] = -3.4e38, -1
            return scores, rows

        def reconstruct_batch(self, rows: np.ndarray) -> np.ndarray:
            return exact.reconstruct_batch(rows)

    loaded.faiss_index = ShortIndex()
    retriever = HybridRetriever(loaded, loaded.load_lexical(), vector_pool=5, lexical_pool=2)
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
    module.omp_threads = []
    module.omp_set_num_threads = module.omp_threads.append
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
    assert initialize(triton, repo.retrieve_dir).model.retriever.index.count == len(
        repo.index.products
    )


def test_settings_come_from_the_config_with_the_code_defaults() -> None:
    from ecomsearch.serving.retrieve import RetrieveSettings

    assert RetrieveSettings.from_config({}) == RetrieveSettings()
    config = {"parameters": {"vector_pool": {"string_value": "7"}}}
    assert RetrieveSettings.from_config(config) == RetrieveSettings(vector_pool=7)
    with pytest.raises(ValueError, match="'lexical_pool' must be >= 1"):
        RetrieveSettings.from_config({"parameters": {"lexical_pool": {"string_value": "0"}}})
