"""The GPU index plan (ecomsearch.index.gpu), its CPU equivalent's recall, and place_on_device
building it for an HNSW base, with a stand-in faiss whose "GPU" is the CPU."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import faiss
import numpy as np
import pytest

from ecomsearch.index import gpu
from ecomsearch.live.catalog import flat_vectors
from ecomsearch.loadtest.scaling import CLUSTERS, clustered_unit_vectors
from ecomsearch.serving.retrieve import place_on_device

D = 384


def ivf_plan(count: int, dimension: int = D) -> gpu.GpuIndexPlan:
    """The plan when the exact index misses the budget by one byte."""
    return gpu.plan(count, dimension, gpu.flat_bytes(count, dimension) - 1)


def recall_at_100(index, queries: np.ndarray, vectors: np.ndarray) -> float:
    """As served: k=200 searched, the first 100 compared with exact search's 100."""
    _, truth = faiss.knn(queries, vectors, 100, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 200)
    return gpu.recall(found[:, :100], truth)


# The plan.


def test_the_plan_is_exact_while_the_float32_vectors_fit_the_budget() -> None:
    fits = gpu.plan(10_000, D, budget_bytes=10_000 * D * 4)
    assert (fits.kind, fits.device_bytes, fits.nlist, fits.nprobe) == ("flat", 10_000 * D * 4, 0, 0)

    beyond = gpu.plan(10_000, D, budget_bytes=10_000 * D * 4 - 1)
    assert beyond.kind == "ivf_sq8"
    assert beyond.device_bytes <= beyond.budget_bytes
    assert beyond.nlist > 0 and 0 < beyond.nprobe <= beyond.nlist


def test_the_plan_stays_on_the_cpu_when_not_even_the_ivf_fits() -> None:
    count = 100_000
    nlist = gpu.ivf_lists(count)
    assert gpu.plan(count, D, gpu.ivf_sq8_bytes(count, D, nlist)).kind == "ivf_sq8"
    assert gpu.plan(count, D, gpu.ivf_sq8_bytes(count, D, nlist) - 1).kind == "cpu"


def test_the_default_budget_switches_at_tens_of_millions_of_384_d_products() -> None:
    assert gpu.plan(20_000_000, D).kind == "flat"  # 30.7 GB of float32 vectors
    assert gpu.plan(30_000_000, D).kind == "ivf_sq8"
    assert gpu.plan(100_000_000, D).kind == "cpu"
    assert gpu.plan(30_000_000, D).device_bytes < gpu.DEFAULT_BUDGET_BYTES


def test_the_ivf_codes_take_about_a_quarter_of_the_float32_vectors() -> None:
    count = 30_000_000
    ratio = gpu.ivf_sq8_bytes(count, D, gpu.ivf_lists(count)) / gpu.flat_bytes(count, D)
    assert 0.25 < ratio < 0.27  # (384 + 8) / 1536, plus padding and centroids


def test_ivf_parameters_scale_with_n() -> None:
    plans = [ivf_plan(n) for n in (100_000, 400_000, 1_600_000, 6_400_000)]
    assert [p.nlist for p in plans] == [1265, 2530, 5060, 10119]  # 4 * sqrt(n)
    assert [p.nprobe for p in plans] == [80, 159, 317, 633]  # nlist / 16, rounded up
    assert [p.train_count for p in plans] == [64 * p.nlist for p in plans]
    sizes = [p.device_bytes for p in plans]
    assert sizes == sorted(set(sizes))  # strictly growing


def test_ivf_parameters_stay_within_what_training_and_the_gpu_allow() -> None:
    small = ivf_plan(2_000)  # 4 * sqrt(n) = 179 lists would get 11 training vectors each
    assert small.nlist == 2_000 // 39 and small.train_count == 2_000
    assert small.nprobe == 16
    huge = ivf_plan(2_000_000_000)
    assert huge.nlist == 178_885 and huge.nprobe == 2048  # the GPU's k-selection limit


def test_the_plan_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        gpu.plan(0, D)
    with pytest.raises(ValueError, match="no GPU index"):
        gpu.build_cpu_equivalent(np.zeros((5, D), np.float32), gpu.plan(5, D, 1))
    with pytest.raises(ValueError, match="shape"):
        gpu.build_cpu_equivalent(np.zeros((5, D), np.float32), gpu.plan(6, D))


# nprobe tuning, on an index whose recall is known for each nprobe.


class ProbeThresholdIndex:
    """Finds the true neighbours only with at least `needed` probes."""

    def __init__(self, truth: np.ndarray, needed: int) -> None:
        self.truth, self.needed, self.probes = truth, needed, []

    def search(self, queries: np.ndarray, k: int, params):
        self.probes.append(params.nprobe)
        found = self.truth if params.nprobe >= self.needed else self.truth + 10_000
        return np.zeros(found.shape, np.float32), found


@pytest.mark.parametrize(
    ("start", "needed", "chosen"),
    [(64, 100, 128), (512, 100, 128), (64, 16, 16), (64, 5000, 1000)],
)
def test_tuning_finds_the_fewest_probes_that_reach_the_recall_target(
    start: int, needed: int, chosen: int
) -> None:
    vectors = np.eye(200, D, dtype=np.float32)
    truth = np.tile(np.arange(100), (gpu.TUNING_QUERIES, 1))
    index = ProbeThresholdIndex(truth, needed)
    index_plan = gpu.GpuIndexPlan("ivf_sq8", 200, D, 1, 1, nlist=1000, nprobe=start)

    nprobe, reached = gpu.tune_nprobe(index, vectors, index_plan, lambda q, k: truth[:, :k])

    assert nprobe == chosen
    assert reached == (1.0 if needed <= 1000 else 0.0)  # 1000 lists at most: reported, not met


# The CPU equivalent on synthetic clustered unit vectors (ecomsearch bench-scaling's).


@pytest.fixture(scope="module")
def clustered() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """40,000 vectors around 2,000 centres (20 a cluster: a query's 100 nearest span several
    clusters, the hard case) and around 200 (200 a cluster), with 200 fresh probe queries each."""
    data = {}
    for clusters in (CLUSTERS, 200):
        centres = np.random.default_rng(0).normal(0, 1, (clusters, D)).astype(np.float32)
        data[clusters] = (
            clustered_unit_vectors(40_000, 1, centres),
            clustered_unit_vectors(200, 2, centres),
        )
    return data


@pytest.fixture(scope="module")
def built(clustered) -> dict[int, gpu.BuiltIndex]:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return {
            clusters: gpu.build_cpu_equivalent(vectors, ivf_plan(len(vectors)))
            for clusters, (vectors, _) in clustered.items()
        }
    finally:
        faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("clusters", [CLUSTERS, 200])
def test_the_ivf_plan_reaches_recall_at_100_on_fresh_queries(clustered, built, clusters) -> None:
    vectors, probes = clustered[clusters]
    result = built[clusters]
    index = result.index

    assert isinstance(index, faiss.IndexIVFScalarQuantizer)
    assert index.nlist == result.plan.nlist == gpu.ivf_lists(len(vectors))
    assert index.nprobe == result.plan.nprobe < index.nlist  # not an exhaustive scan
    assert result.recall_at_100 >= gpu.RECALL_TARGET + gpu.TUNING_MARGIN
    assert recall_at_100(index, probes, vectors) >= 0.95


def test_tuning_probes_more_lists_where_the_neighbourhoods_are_spread(built) -> None:
    assert built[200].plan.nprobe == gpu.MIN_PROBES
    assert built[CLUSTERS].plan.nprobe >= 8 * gpu.MIN_PROBES


def test_the_exact_plan_builds_an_exact_index(clustered) -> None:
    vectors, probes = clustered[200]
    result = gpu.build_cpu_equivalent(vectors[:5000], gpu.plan(5000, D))
    assert result.plan.kind == "flat" and result.recall_at_100 is None
    assert isinstance(result.index, faiss.IndexFlatIP)
    assert recall_at_100(result.index, probes, vectors[:5000]) == 1.0


def test_to_gpu_says_what_to_install_without_gpu_support() -> None:
    cpu_only = SimpleNamespace(IndexFlatIP=faiss.IndexFlatIP)
    with pytest.raises(RuntimeError, match="install faiss-gpu"):
        gpu.to_gpu(faiss.IndexFlatIP(D), object(), 0, cpu_only)


# place_on_device with a stand-in faiss: the real module, plus GPU entry points that record
# their calls and leave the index on the CPU.


class FakeGpuResources:
    pass


def fake_gpu_faiss(calls: list[tuple]) -> ModuleType:
    module = ModuleType("faiss")
    module.__dict__.update({k: v for k, v in vars(faiss).items() if not k.startswith("__")})
    module.StandardGpuResources = FakeGpuResources

    def index_cpu_to_gpu(resources, device, index):
        calls.append(("index_cpu_to_gpu", resources, device, type(index).__name__, index.ntotal))
        return index

    def knn_gpu(resources, queries, vectors, k, **options):
        calls.append(("knn_gpu", resources, options))
        return faiss.knn(queries, vectors, k, metric=options["metric"])

    module.index_cpu_to_gpu = index_cpu_to_gpu
    module.knn_gpu = knn_gpu
    return module


@pytest.fixture(scope="module")
def hnsw_base(clustered) -> faiss.IndexHNSWFlat:
    vectors = clustered[200][0][:3000]
    index = faiss.IndexHNSWFlat(D, 16, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    return index


def test_an_hnsw_base_that_fits_is_searched_exactly_on_the_gpu(hnsw_base, clustered) -> None:
    calls: list[tuple] = []
    exact_bytes = gpu.flat_bytes(3000, D)

    placed, resources = place_on_device(
        hnsw_base, "GPU", 1, fake_gpu_faiss(calls), gpu_budget_bytes=exact_bytes
    )

    assert isinstance(placed, gpu.GpuSearchIndex) and placed.plan.kind == "flat"
    assert isinstance(resources, FakeGpuResources)
    # An empty GpuIndexFlatIP on the instance's GPU, filled from host memory.
    assert calls == [("index_cpu_to_gpu", resources, 1, "IndexFlatIP", 0)]
    assert placed.index.ntotal == placed.ntotal == 3000
    assert recall_at_100(placed, clustered[200][1], flat_vectors(hnsw_base)) == 1.0


def test_an_hnsw_base_beyond_the_budget_gets_an_ivf_on_the_gpu(hnsw_base) -> None:
    calls: list[tuple] = []
    fake = fake_gpu_faiss(calls)
    budget = gpu.flat_bytes(3000, D) - 1

    placed, resources = place_on_device(hnsw_base, "GPU", 1, fake, gpu_budget_bytes=budget)

    assert isinstance(placed, gpu.GpuSearchIndex) and placed.plan.kind == "ivf_sq8"
    assert placed.plan.nlist == gpu.ivf_lists(3000)
    assert calls == [
        # k-means and list assignment on the GPU, then the filled IVF copied over
        ("index_cpu_to_gpu", resources, 1, "IndexFlatIP", 0),
        ("index_cpu_to_gpu", resources, 1, "IndexIVFScalarQuantizer", 3000),
        # tuning's ground truth paged through the GPU, never needing the exact index's room
        (
            "knn_gpu",
            resources,
            {
                "metric": faiss.METRIC_INNER_PRODUCT,
                "device": 1,
                "vectorsMemoryLimit": gpu.GPU_EXACT_TILE_BYTES,
            },
        ),
    ]
    assert placed.index.nprobe == placed.plan.nprobe
    assert placed.recall_at_100 >= gpu.RECALL_TARGET
    assert "ivf_sq8" in placed.describe() and "recall@100" in placed.describe()


def test_the_gpu_ivf_takes_the_catalogs_hnsw_search_parameters(hnsw_base) -> None:
    """The live catalog searches an HNSW base with SearchParametersHNSW and an ID selector; an
    IVF (CPU or GPU) raises on them."""
    placed, _ = place_on_device(
        hnsw_base, "GPU", 0, fake_gpu_faiss([]), gpu_budget_bytes=gpu.flat_bytes(3000, D) - 1
    )
    queries = flat_vectors(hnsw_base)[:5]
    allowed = np.zeros(3000, dtype=bool)
    allowed[::2] = True
    bitmap = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(3000, faiss.swig_ptr(bitmap))
    params = faiss.SearchParametersHNSW(sel=selector, efSearch=256)
    with pytest.raises(RuntimeError):
        placed.index.search(queries, 10, params=params)

    _, rows = placed.search(queries, 10, params=params)

    assert (rows >= 0).all() and allowed[rows].all()  # the CPU stand-in honours the selector


def test_the_gpu_index_hands_the_catalog_the_host_vectors_without_a_copy(hnsw_base) -> None:
    placed, _ = place_on_device(hnsw_base, "GPU", 0, fake_gpu_faiss([]))

    vectors = flat_vectors(placed)  # what LiveCatalog.load keeps for its exact searches

    assert vectors.shape == (3000, D)
    assert np.shares_memory(vectors, flat_vectors(hnsw_base))


def test_an_hnsw_base_that_fits_no_gpu_index_stays_on_the_cpu(hnsw_base) -> None:
    calls: list[tuple] = []
    assert place_on_device(hnsw_base, "GPU", 1, fake_gpu_faiss(calls), gpu_budget_bytes=1000) == (
        hnsw_base,
        None,
    )
    assert calls == []


def test_the_gpu_index_shares_the_resources_of_the_index_it_replaces(hnsw_base) -> None:
    calls: list[tuple] = []
    shared = FakeGpuResources()

    _, resources = place_on_device(hnsw_base, "GPU", 1, fake_gpu_faiss(calls), shared)

    assert resources is shared and calls[0][1] is shared
