"""The index a KIND_GPU `retrieve` instance searches, planned from the catalog's size and a device
memory budget and built from the base index's vectors.

`build-index` writes an exact IndexFlatIP up to 50,000 products and an HNSW graph above. FAISS has
no GPU HNSW, so a large catalog used to stay on the CPU of a GPU instance. Here the instance builds
its own GPU index from the same vectors instead, one of:

- "flat": exact inner-product search (GpuIndexFlatIP) while the float32 vectors fit the budget.
  A GPU scans float32 vectors at memory bandwidth, so exact search stays cheap far beyond the size
  where the CPU needs HNSW, and it needs no recall check.
- "ivf_sq8": beyond the budget, an inverted file (spherical k-means coarse quantizer) holding
  8-bit scalar-quantized residuals (GpuIndexIVFScalarQuantizer, QT_8bit): d + 8 bytes a vector
  instead of 4 * d, about 3.9 times as many products in the same memory. Not IVF-Flat: it keeps
  the same float32 vectors as exact search plus ids and centroids, so it can never fit where exact
  search did not. Not IVF-PQ: recall@100 >= 0.95 with PQ codes typically needs a re-ranking pass.
  Not CAGRA: faiss-cpu has no equivalent to test it with. Against float32 lists (IVF-Flat), the
  8-bit codes cost 0.0025 recall@100 on 54k real product embeddings and 0.003 on 100k synthetic
  vectors; on 1M synthetic vectors their recall@100 levels off at 0.988 whatever the nprobe.
- "cpu": not even the IVF fits; the base stays on the CPU as before rather than the instance
  failing to load.

`plan` is pure (count, dimension, budget -> kind and parameters). `build_cpu_equivalent` builds the
same index on the CPU, so the choice and its recall are tested on machines without a GPU;
`build_gpu_index` builds it on a device. Both tune nprobe on the built index (see `tune_nprobe`):
how many lists reach recall@100 >= 0.95 depends on the data, not only on n.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

GIB = 1 << 30
# An H100 (SXM or PCIe) has 80 GB of HBM.
H100_MEMORY_BYTES = 80 * GIB
# 40% of an H100 (32 GiB) for one instance's index. One retrieve instance runs on each GPU, but
# while a compaction loads the next base, its index is built while the current one still serves:
# two coexist on the device, so each may take at most half. The rest of that half is left to the
# query and cross encoders, the CUDA context and FAISS's scratch memory (StandardGpuResources
# reserves up to 1.5 GiB a device). 32 GiB hold ~22M exact 384-d vectors, ~86M as IVF-SQ8 codes.
DEFAULT_BUDGET_BYTES = int(0.4 * H100_MEMORY_BYTES)

FLOAT32_BYTES = 4
ID_BYTES = 8  # the GPU inverted lists store each vector's int64 id (INDICES_64_BIT)
# GPU IVF lists are laid out in blocks of 32 vectors: up to 31 vectors of padding a list, counted
# in full so the estimate is an upper bound.
GPU_LIST_BLOCK_VECTORS = 32

# nlist = 4 * sqrt(n), the low end of FAISS's guideline of 4..16 * sqrt(n) ("Guidelines to choose
# an index" in the FAISS wiki). Few, long lists suit a GPU (it scans each probed list in parallel
# and pays per probed list in its k-selection), keep k-means cheap (its cost grows as nlist^2 at a
# fixed number of training vectors a list), and the 100-200 neighbours retrieve wants span fewer
# lists, so fewer probes reach the recall target.
LISTS_PER_SQRT_N = 4
# The plan's nprobe is where tuning starts: nlist / 16, about what 54k real product embeddings
# need for recall@100 0.95 (7% of the lists; 12.6% for the 0.96 tuning aims at). Synthetic
# clustered vectors need 0.4% (16 of 4,000 lists at 1M), 12.6% at 100k and 50% at 40k, where a
# query's 100 nearest span five clusters of 20: a fixed rule would either miss the target or
# waste the GPU, so the build measures.
PROBE_FRACTION = 1 / 16
MIN_PROBES = 16
# The largest nprobe (and k) FAISS's GPU k-selection supports (GPU_MAX_SELECTION_K).
MAX_PROBES = 2048
# k-means trains on 64 sampled vectors a list: FAISS warns below 39 and samples down to 256;
# 64 costs a quarter of FAISS's default clustering time.
TRAIN_VECTORS_PER_LIST = 64
MIN_TRAIN_VECTORS_PER_LIST = 39
KMEANS_ITERATIONS = 10  # what FAISS's GPU IVF uses for its (large) clusterings
# The 8-bit scalar quantizer only learns each dimension's range of the residuals.
SQ_TRAIN_VECTORS = 65_536
ADD_CHUNK_VECTORS = 65_536  # vectors assigned to their lists per call while filling the index
SEED = 1234

# Tuning nprobe: recall@100 against exact search on sampled product vectors perturbed by
# N(0, 0.05) a dimension, as `build-index` measures its HNSW recall (so a product is not trivially
# its own neighbour). A 1-point margin covers the estimate's noise: 200 queries x 100 neighbours
# give a standard error of about 0.004 around 0.95.
RECALL_K = 100
RECALL_TARGET = 0.95
TUNING_MARGIN = 0.01
TUNING_QUERIES = 200
TUNING_NOISE = 0.05
# Exact search for the tuning's ground truth on a GPU pages the host vectors through this much
# device memory, so it never needs the room the exact index did not fit in.
GPU_EXACT_TILE_BYTES = GIB

FLAT, IVF_SQ8, CPU = "flat", "ivf_sq8", "cpu"


@dataclass(frozen=True)
class GpuIndexPlan:
    """What a GPU instance builds for `count` vectors of `dimension`: `kind` ("flat", "ivf_sq8",
    or "cpu" when neither fits) and, for the IVF, its lists, (starting) probes and the size of
    its training sample."""

    kind: str
    count: int
    dimension: int
    budget_bytes: int
    device_bytes: int  # estimated device memory of the index (an upper bound); 0 for "cpu"
    nlist: int = 0
    nprobe: int = 0
    train_count: int = 0

    def describe(self) -> str:
        size = f"~{self.device_bytes / GIB:.2f} GiB of a {self.budget_bytes / GIB:.2f} GiB budget"
        if self.kind == IVF_SQ8:
            return f"{self.kind} (nlist {self.nlist}, nprobe {self.nprobe}), {size}"
        if self.kind == FLAT:
            return f"{self.kind} (exact), {size}"
        return (
            f"{self.kind}: {self.count} x {self.dimension} vectors fit no GPU index in "
            f"{self.budget_bytes / GIB:.2f} GiB"
        )


@dataclass(frozen=True)
class BuiltIndex:
    """A built index, its plan with the nprobe tuning chose, and the recall@100 it measured
    (None for exact search)."""

    index: Any
    plan: GpuIndexPlan
    recall_at_100: float | None


def flat_bytes(count: int, dimension: int) -> int:
    """Device bytes of the exact index: the float32 vectors themselves."""
    return count * dimension * FLOAT32_BYTES


def ivf_sq8_bytes(count: int, dimension: int, nlist: int) -> int:
    """Device bytes of the IVF-SQ8 index: a byte a dimension and an id a vector, the worst-case
    padding of each list to whole 32-vector blocks, and the float32 centroids."""
    codes = count * (dimension + ID_BYTES)
    padding = nlist * (GPU_LIST_BLOCK_VECTORS - 1) * (dimension + ID_BYTES)
    return codes + padding + nlist * dimension * FLOAT32_BYTES


def ivf_lists(count: int) -> int:
    """4 * sqrt(n) lists, but never so many that a list gets fewer than 39 training vectors."""
    lists = round(LISTS_PER_SQRT_N * math.sqrt(count))
    return max(1, min(lists, count // MIN_TRAIN_VECTORS_PER_LIST))


def plan(count: int, dimension: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> GpuIndexPlan:
    """The index to build for `count` unit vectors of `dimension` in `budget_bytes` of device
    memory: exact while the float32 vectors fit, IVF-SQ8 beyond, "cpu" when neither fits."""
    if count < 1 or dimension < 1 or budget_bytes < 1:
        raise ValueError(
            f"count, dimension and budget must be positive, got {count}, {dimension}, "
            f"{budget_bytes}"
        )
    exact = flat_bytes(count, dimension)
    if exact <= budget_bytes:
        return GpuIndexPlan(FLAT, count, dimension, budget_bytes, exact)
    nlist = ivf_lists(count)
    compressed = ivf_sq8_bytes(count, dimension, nlist)
    if compressed > budget_bytes:
        return GpuIndexPlan(CPU, count, dimension, budget_bytes, 0)
    return GpuIndexPlan(
        IVF_SQ8,
        count,
        dimension,
        budget_bytes,
        compressed,
        nlist=nlist,
        nprobe=min(nlist, MAX_PROBES, max(MIN_PROBES, math.ceil(nlist * PROBE_FRACTION))),
        train_count=min(count, nlist * TRAIN_VECTORS_PER_LIST),
    )


def _faiss(faiss_module: Any = None) -> Any:
    if faiss_module is not None:
        return faiss_module
    import faiss

    return faiss


def _checked_vectors(vectors: np.ndarray, index_plan: GpuIndexPlan) -> np.ndarray:
    if index_plan.kind not in (FLAT, IVF_SQ8):
        raise ValueError(f"a {index_plan.kind!r} plan builds no GPU index")
    if vectors.shape != (index_plan.count, index_plan.dimension):
        raise ValueError(
            f"vectors have shape {vectors.shape}, the plan is for "
            f"({index_plan.count}, {index_plan.dimension})"
        )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _build_ivf_sq8(
    vectors: np.ndarray, index_plan: GpuIndexPlan, faiss: Any, new_flat_ip: Callable[[], Any]
) -> Any:
    """A filled CPU IndexIVFScalarQuantizer. `new_flat_ip()` makes the empty IndexFlatIP that runs
    the two heavy steps, k-means and assigning every vector to its list (n * nlist * d each): a
    GPU index for a GPU instance, so the CPU only encodes."""
    from faiss.contrib.ivf_tools import add_preassigned

    n, d = vectors.shape
    nlist = index_plan.nlist
    rng = np.random.default_rng(SEED)
    sample = vectors[np.sort(rng.choice(n, size=index_plan.train_count, replace=False))]

    clustering = faiss.Clustering(d, nlist)
    clustering.spherical = True  # unit-norm centroids for inner product, as FAISS's IVF does
    clustering.niter = KMEANS_ITERATIONS
    clustering.seed = SEED
    clustering.max_points_per_centroid = index_plan.train_count  # already sampled
    assigner = new_flat_ip()
    clustering.train(sample, assigner)  # leaves the final centroids in `assigner`
    centroids = faiss.vector_to_array(clustering.centroids).reshape(nlist, d)

    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    # The quantizer already holds its nlist centroids: this trains only the codes' ranges.
    index.train(sample[:SQ_TRAIN_VECTORS])
    for start in range(0, n, ADD_CHUNK_VECTORS):
        chunk = vectors[start : start + ADD_CHUNK_VECTORS]
        _, lists = assigner.search(chunk, 1)
        add_preassigned(index, chunk, np.ascontiguousarray(lists[:, 0]))
    index.nprobe = index_plan.nprobe
    return index


def tuning_queries(vectors: np.ndarray, count: int = TUNING_QUERIES) -> np.ndarray:
    """Sampled vectors perturbed by N(0, 0.05) a dimension and renormalised."""
    rng = np.random.default_rng(SEED)
    picks = rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)
    queries = vectors[picks] + rng.normal(0, TUNING_NOISE, (len(picks), vectors.shape[1]))
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of each query's true neighbours (rows of `truth`) that `found` contains."""
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


def tune_nprobe(
    index: Any,
    vectors: np.ndarray,
    index_plan: GpuIndexPlan,
    exact_neighbours: Callable[[np.ndarray, int], np.ndarray],
    faiss_module: Any = None,
) -> tuple[int, float]:
    """The smallest nprobe, from the plan's by halving or doubling, whose recall@100 against
    `exact_neighbours` (queries, k -> ids) reaches RECALL_TARGET + TUNING_MARGIN, and that
    recall; the largest allowed nprobe (min(nlist, 2048)) when none does."""
    faiss = _faiss(faiss_module)
    queries = tuning_queries(vectors)
    k = min(RECALL_K, len(vectors))
    truth = exact_neighbours(queries, k)
    goal = RECALL_TARGET + TUNING_MARGIN
    most = min(index_plan.nlist, MAX_PROBES)

    def measure(nprobe: int) -> float:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        return recall(index.search(queries, k, params=params)[1], truth)

    nprobe = min(index_plan.nprobe, most)
    reached = measure(nprobe)
    if reached >= goal:
        while nprobe > min(MIN_PROBES, most):
            fewer = max(min(MIN_PROBES, most), nprobe // 2)
            fewer_recall = measure(fewer)
            if fewer_recall < goal:
                break
            nprobe, reached = fewer, fewer_recall
    else:
        while reached < goal and nprobe < most:
            nprobe = min(most, nprobe * 2)
            reached = measure(nprobe)
    return nprobe, reached


def _tuned(
    index: Any,
    vectors: np.ndarray,
    index_plan: GpuIndexPlan,
    exact_neighbours: Callable[[np.ndarray, int], np.ndarray],
    faiss: Any,
) -> BuiltIndex:
    nprobe, reached = tune_nprobe(index, vectors, index_plan, exact_neighbours, faiss)
    index.nprobe = nprobe
    return BuiltIndex(index, dataclasses.replace(index_plan, nprobe=nprobe), reached)


def build_cpu_equivalent(
    vectors: np.ndarray, index_plan: GpuIndexPlan, faiss_module: Any = None
) -> BuiltIndex:
    """The CPU index of the type and parameters `build_gpu_index` puts on a GPU (IndexFlatIP, or
    IndexIVFScalarQuantizer with the plan's nlist and the same nprobe tuning), to test the plan
    and measure its recall where there is no GPU."""
    faiss = _faiss(faiss_module)
    vectors = _checked_vectors(vectors, index_plan)
    d = index_plan.dimension
    if index_plan.kind == FLAT:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return BuiltIndex(index, index_plan, None)
    index = _build_ivf_sq8(vectors, index_plan, faiss, lambda: faiss.IndexFlatIP(d))

    def exact_neighbours(queries: np.ndarray, k: int) -> np.ndarray:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]

    return _tuned(index, vectors, index_plan, exact_neighbours, faiss)


def to_gpu(cpu_index: Any, resources: Any, device_id: int, faiss_module: Any = None) -> Any:
    """`cpu_index` copied to GPU `device_id` by faiss.index_cpu_to_gpu; `resources` (a
    StandardGpuResources) must outlive the copy."""
    faiss = _faiss(faiss_module)
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        raise RuntimeError(
            "moving an index to a GPU needs faiss with GPU support; install faiss-gpu"
        )
    return faiss.index_cpu_to_gpu(resources, device_id, cpu_index)


def build_gpu_index(
    vectors: np.ndarray,
    index_plan: GpuIndexPlan,
    resources: Any,
    device_id: int,
    faiss_module: Any = None,
) -> BuiltIndex:
    """The plan's index on GPU `device_id`. Exact: an empty GpuIndexFlatIP filled from host memory
    (no host copy). IVF-SQ8: k-means and list assignment on the GPU, codes written on the CPU,
    then the filled index copied over, which allocates each list at its size (adding on the GPU
    grows lists by powers of two, up to twice the memory); nprobe is tuned on the GPU against
    exact search paged through GPU_EXACT_TILE_BYTES of device memory."""
    faiss = _faiss(faiss_module)
    vectors = _checked_vectors(vectors, index_plan)
    d = index_plan.dimension

    def new_flat_ip() -> Any:
        return to_gpu(faiss.IndexFlatIP(d), resources, device_id, faiss)

    if index_plan.kind == FLAT:
        index = new_flat_ip()
        index.add(vectors)
        return BuiltIndex(index, index_plan, None)
    cpu_index = _build_ivf_sq8(vectors, index_plan, faiss, new_flat_ip)
    index = to_gpu(cpu_index, resources, device_id, faiss)

    def exact_neighbours(queries: np.ndarray, k: int) -> np.ndarray:
        return faiss.knn_gpu(
            resources,
            queries,
            vectors,
            k,
            metric=faiss.METRIC_INNER_PRODUCT,
            device=device_id,
            vectorsMemoryLimit=GPU_EXACT_TILE_BYTES,
        )[1]

    return _tuned(index, vectors, index_plan, exact_neighbours, faiss)


class GpuSearchIndex:
    """The index an HNSW base is served with on a GPU: what `build_gpu_index` built, with the host
    vectors it was built from.

    It answers the calls the live catalog makes of a base index. `search` translates the catalog's
    search parameters (SearchParametersHNSW with an ID selector, written for the HNSW base) into
    ones the GPU index takes: a GPU IVF raises on any other parameter class and reads its nprobe
    from them. The selector is passed on; FAISS's GPU indexes ignore it, which the catalog already
    handles by searching short queries again, exactly. `reconstruct_n` returns the host vectors,
    so the catalog's exact searches never copy them back from the device.
    """

    def __init__(
        self,
        built: BuiltIndex,
        host_vectors: np.ndarray,
        host_owner: Any = None,
        faiss_module: Any = None,
    ) -> None:
        self.index = built.index
        self.plan = built.plan
        self.recall_at_100 = built.recall_at_100
        self.host_vectors = host_vectors
        self._host_owner = host_owner  # keeps the memory host_vectors may be a view of
        self._faiss = _faiss(faiss_module)
        self.ntotal = int(self.index.ntotal)
        self.d = int(self.index.d)

    def describe(self) -> str:
        if self.recall_at_100 is None:
            return self.plan.describe()
        return f"{self.plan.describe()}, recall@100 {self.recall_at_100:.4f} (tuning sample)"

    def search(
        self, embeddings: np.ndarray, k: int, params: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        selector = None if params is None else getattr(params, "sel", None)
        if self.plan.kind == IVF_SQ8:
            ivf_params = self._faiss.SearchParametersIVF(nprobe=self.plan.nprobe)
            if selector is not None:
                ivf_params.sel = selector
            return self.index.search(embeddings, k, params=ivf_params)
        if selector is not None:
            return self.index.search(
                embeddings, k, params=self._faiss.SearchParameters(sel=selector)
            )
        return self.index.search(embeddings, k)

    def reconstruct_n(self, start: int, count: int) -> np.ndarray:
        return self.host_vectors[start : start + count]
