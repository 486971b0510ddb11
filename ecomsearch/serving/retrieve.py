"""The `retrieve` model: hybrid candidates (FAISS vectors + BM25) and their ranking features."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.fingerprint import file_sha256
from ecomsearch.index import gpu as gpu_index
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog, flat_vectors
from ecomsearch.live.filters import SearchFilter
from ecomsearch.live.location import served_store_url
from ecomsearch.live.served import COMPACT_DELTA_ROWS, LiveRetriever
from ecomsearch.paths import INDEX_DIR, ModelRepositoryLayout
from ecomsearch.query import decode_queries, queries_array
from ecomsearch.ranking.candidates import LEXICAL_POOL, VECTOR_POOL, HybridRetriever
from ecomsearch.ranking.features import FEATURE_NAMES, check_ranker_features
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
)
from ecomsearch.serving.metrics import (
    APPLIED_SEQ,
    CANDIDATES,
    CAUGHT_UP,
    DELTA_ROWS,
    EMPTY_RESULTS,
    INDEX_BUILT,
    INDEX_PRODUCTS,
    QUERIES,
    MetricSpec,
    timestamp_of,
)
from ecomsearch.store import redact

_VECTOR_RANK = FEATURE_NAMES.index("vector_rank")
_LEXICAL_RANK = FEATURE_NAMES.index("lexical_rank")


@dataclass(frozen=True)
class RetrieveSettings:
    """The `parameters` of retrieve's config.pbtxt, with their defaults."""

    vector_pool: int = VECTOR_POOL
    lexical_pool: int = LEXICAL_POOL
    # One thread per instance: FAISS's OpenMP fan-out costs more than it saves on the few
    # queries of a dynamic batch (54k-product flat search: 8 ms with 2 threads, 3.5 ms with 1),
    # and the encoder needs the other core.
    faiss_omp_threads: int = 1
    # How often each instance asks the catalog store for changes (see ecomsearch.live.follower).
    catalog_poll_interval_ms: int = 50
    # Delta rows that start a compaction (see ecomsearch.live.served).
    compact_delta_rows: int = COMPACT_DELTA_ROWS
    # KIND_GPU instances: device memory the index of an HNSW base may take on the GPU (exact
    # while its float32 vectors fit, IVF-SQ8 beyond; ecomsearch.index.gpu).
    gpu_index_budget_mb: int = gpu_index.DEFAULT_BUDGET_BYTES >> 20

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RetrieveSettings:
        return cls(
            vector_pool=int_parameter(config, "vector_pool", cls.vector_pool, 1),
            lexical_pool=int_parameter(config, "lexical_pool", cls.lexical_pool, 1),
            faiss_omp_threads=int_parameter(config, "faiss_omp_threads", cls.faiss_omp_threads, 1),
            catalog_poll_interval_ms=int_parameter(
                config, "catalog_poll_interval_ms", cls.catalog_poll_interval_ms, 1
            ),
            compact_delta_rows=int_parameter(
                config, "compact_delta_rows", cls.compact_delta_rows, 1
            ),
            gpu_index_budget_mb=int_parameter(
                config, "gpu_index_budget_mb", cls.gpu_index_budget_mb, 1
            ),
        )


def place_on_device(
    faiss_index: Any,
    instance_kind: str,
    device_id: int,
    faiss_module: Any,
    resources: Any = None,
    gpu_budget_bytes: int = gpu_index.DEFAULT_BUDGET_BYTES,
):
    """Moves the index to this instance's own GPU for KIND_GPU instances.

    Returns (index, gpu_resources); the resources must outlive the index. Pass the resources of
    the index this one replaces to share them: each StandardGpuResources reserves its own
    scratch memory on the device. A flat index is copied as it is. An HNSW graph has no FAISS GPU
    implementation: the device gets the index ecomsearch.index.gpu plans for its vectors within
    `gpu_budget_bytes` (exact while the float32 vectors fit, IVF-SQ8 beyond), returned as a
    GpuSearchIndex whose `plan` says which (and `describe()` for the log). When not even the IVF
    fits, the HNSW index stays on the CPU and the resources are None.
    """
    if instance_kind != "GPU":
        return faiss_index, None
    if not hasattr(faiss_module, "StandardGpuResources"):
        raise RuntimeError(
            "this instance is KIND_GPU but the installed faiss has no GPU support; "
            "install faiss-gpu"
        )
    if isinstance(faiss_index, faiss_module.IndexHNSWFlat):
        index_plan = gpu_index.plan(int(faiss_index.ntotal), int(faiss_index.d), gpu_budget_bytes)
        if index_plan.kind == gpu_index.CPU:
            return faiss_index, None
        resources = resources or faiss_module.StandardGpuResources()
        vectors = flat_vectors(faiss_index)  # a view of the graph's storage: no copy
        built = gpu_index.build_gpu_index(vectors, index_plan, resources, device_id, faiss_module)
        return gpu_index.GpuSearchIndex(built, vectors, faiss_index, faiss_module), resources
    resources = resources or faiss_module.StandardGpuResources()
    return faiss_module.index_cpu_to_gpu(resources, device_id, faiss_index), resources


def parse_filters(pb_utils, request, batch: int) -> np.ndarray:
    """One SearchFilter per query (an object array [batch]) from the optional filter inputs."""
    values: dict[str, list[Any]] = {}
    for name in contract.FILTER_INPUTS:
        raw = input_array(pb_utils, request, name)
        if raw is None:
            continue
        if raw.shape != (batch, 1):
            raise RequestError(f"input {name!r} must have shape [{batch}, 1], got {raw.shape}")
        column = raw[:, 0]
        if name in (contract.FILTER_CATEGORY, contract.FILTER_BRAND):
            try:
                values[name] = [
                    v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in column
                ]
            except UnicodeDecodeError:
                raise RequestError(f"input {name!r} must be UTF-8") from None
        elif name == contract.FILTER_IN_STOCK:
            values[name] = [bool(v) for v in column]
        else:
            values[name] = [float(v) for v in column]
    filters = np.empty(batch, dtype=object)
    for i in range(batch):
        filters[i] = SearchFilter.parse(
            category=values.get(contract.FILTER_CATEGORY, [None] * batch)[i],
            brand=values.get(contract.FILTER_BRAND, [None] * batch)[i],
            min_price=values.get(contract.FILTER_MIN_PRICE, [None] * batch)[i],
            max_price=values.get(contract.FILTER_MAX_PRICE, [None] * batch)[i],
            in_stock_only=values.get(contract.FILTER_IN_STOCK, [False] * batch)[i],
        )
    return filters


# The per-query filters travel between parse and run as an object array of SearchFilter.
FILTERS = "filters"


def candidate_sources(
    rows: np.ndarray, features: np.ndarray, vector_pool: int, lexical_pool: int
) -> tuple[int, int, int]:
    """(vector, lexical, empty) of a batch of candidates: how many came from each list (a
    candidate in both counts twice) and how many queries had none. A rank feature holds
    log(1 + rank) in its list, log(1 + pool) when the candidate is not in it."""
    found = rows >= 0
    in_vector = found & (features[..., _VECTOR_RANK] < np.float32(np.log1p(vector_pool)))
    in_lexical = found & (features[..., _LEXICAL_RANK] < np.float32(np.log1p(lexical_pool)))
    return int(in_vector.sum()), int(in_lexical.sum()), int((~found.any(axis=1)).sum())


class RetrieveModel(BatchedModel):
    def __init__(
        self,
        pb_utils,
        retriever: HybridRetriever,
        gpu_resources: Any = None,
        lock: threading.Lock | None = None,
    ) -> None:
        super().__init__(pb_utils)
        self.retriever = retriever
        self.dimension = retriever.catalog.dimension
        # faiss.StandardGpuResources of an index moved to a GPU: it must live as long as it.
        self.gpu_resources = gpu_resources
        # Held around every search and every change applied by the follower (see
        # ecomsearch.live.served): a search sees a whole batch of changes or none of it.
        self.lock = lock or threading.Lock()
        self.live: LiveRetriever | None = None

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> RetrieveModel:
        import faiss

        config = model_config(args)
        settings = RetrieveSettings.from_config(config)
        layout, version_dir = ModelRepositoryLayout.of_triton_model(args)
        ranker_info = check_ranker_features(layout.ranker_info)
        (embedding_config,) = [i for i in config["input"] if i["name"] == contract.EMBEDDING]
        dimension = int(embedding_config["dims"][-1])
        faiss.omp_set_num_threads(settings.faiss_omp_threads)
        # One StandardGpuResources for every base version this instance loads (compactions
        # switch bases): a new one per version would leave each one's device memory behind.
        gpu: dict[str, Any] = {"resources": None}

        def load_base(index_dir: Path) -> CatalogIndex:
            index = CatalogIndex.load(
                index_dir, encoder_fingerprint=file_sha256(layout.encoder_onnx), dimension=dimension
            )
            index.faiss_index, resources = place_on_device(
                index.faiss_index,
                args["model_instance_kind"],
                int(args["model_instance_device_id"]),
                faiss,
                gpu["resources"],
                gpu_budget_bytes=settings.gpu_index_budget_mb << 20,
            )
            gpu["resources"] = resources or gpu["resources"]  # kept for the model's lifetime
            if isinstance(index.faiss_index, gpu_index.GpuSearchIndex):
                pb_utils.Logger.log_info(
                    f"retrieve: {index_dir.name} on GPU {args['model_instance_device_id']}: "
                    f"{index.faiss_index.describe()}"
                )
            return index

        index_dir = version_dir / INDEX_DIR
        if not layout.encoder_onnx.is_file():
            raise FileNotFoundError(
                f"encoder {layout.encoder_onnx} not found; run `ecomsearch export-encoder`"
            )
        retriever = HybridRetriever(
            LiveCatalog.load(load_base(index_dir)), settings.vector_pool, settings.lexical_pool
        )
        trained_pools = ranker_info.get("candidate_pools")
        served_pools = {"vector": retriever.vector_pool, "lexical": retriever.lexical_pool}
        if trained_pools is not None and trained_pools != served_pools:
            # Rank features encode "not retrieved" as the pool size: other pools shift them.
            pb_utils.Logger.log_warn(
                f"retrieve: candidate pools {served_pools} differ from the ranker's training "
                f"pools {trained_pools}; rank features will be off its training distribution"
            )
        model = cls(pb_utils, retriever, gpu["resources"]).instrumented(args)
        manifest = retriever.catalog.base.manifest
        store_url = served_store_url(layout, manifest)
        if store_url is None:
            pb_utils.Logger.log_warn(
                f"retrieve: the index at {index_dir} was built without a catalog store; "
                "serving it as built (rebuild it with `ecomsearch build-index` for a live catalog)"
            )
        else:
            model.live = LiveRetriever(
                retriever,
                index_dir,
                store_url,
                model.lock,
                pb_utils.Logger.log_info,
                load_base,
                warn=pb_utils.Logger.log_warn,
                interval_s=settings.catalog_poll_interval_ms / 1000,
                compact_delta_rows=settings.compact_delta_rows,
            ).catch_up_and_start()
        model.metrics.watch(model.catalog_state)
        catalog = retriever.catalog
        pb_utils.Logger.log_info(
            f"retrieve: {catalog.live_count} products ({manifest.count} in the "
            f"{manifest.index_type} index + BM25 at change {manifest.catalog_seq}, "
            f"{catalog.delta_rows} applied since from {redact(store_url or 'no store')}), "
            f"{retriever.width} candidates a query, instance {args['model_instance_name']} on "
            f"{args['model_instance_kind']} {args['model_instance_device_id']}"
        )
        return model

    def counters(self) -> list[tuple[MetricSpec, dict[str, str]]]:
        return [
            *super().counters(),
            (QUERIES, {}),
            (CANDIDATES, {"source": "vector"}),
            (CANDIDATES, {"source": "lexical"}),
            (EMPTY_RESULTS, {}),
        ]

    def catalog_state(self) -> dict[MetricSpec, float | None]:
        """The served catalog's gauges (read without the lock: each value is one attribute)."""
        catalog = self.retriever.catalog
        follower = None if self.live is None else self.live.follower
        return {
            INDEX_PRODUCTS: catalog.live_count,
            INDEX_BUILT: timestamp_of(catalog.base.manifest.built_at),
            DELTA_ROWS: catalog.delta_rows,
            APPLIED_SEQ: catalog.applied_seq,
            CAUGHT_UP: None if follower is None else follower.caught_up_at,
        }

    def finalize(self) -> None:
        if self.live is not None:
            self.live.stop()
        self.metrics.close()

    def parse(self, request) -> Tensors:
        embeddings = input_array(self.pb_utils, request, contract.EMBEDDING)
        if embeddings is None:
            raise RequestError(f"input {contract.EMBEDDING!r} is required")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dimension:
            raise RequestError(
                f"input {contract.EMBEDDING!r} must have shape [batch, {self.dimension}], "
                f"got {embeddings.shape}"
            )
        if not np.isfinite(embeddings).all():
            # FAISS would return arbitrary neighbours for NaN and features would be NaN.
            raise RequestError(f"input {contract.EMBEDDING!r} must be finite (NaN or infinity)")
        queries = decode_queries(input_array(self.pb_utils, request, contract.QUERY))
        if len(queries) != len(embeddings):
            raise RequestError(f"{len(queries)} queries but {len(embeddings)} embeddings")
        return {
            contract.QUERY: queries_array(queries),
            contract.EMBEDDING: embeddings.astype(np.float32, copy=False),
            FILTERS: parse_filters(self.pb_utils, request, len(queries)),
        }

    def run(self, inputs: Tensors) -> Tensors:
        with self.lock:
            if self.live is not None:
                self.live.drain()  # the changes and the base version read since the last run
            candidates = self.retriever.retrieve(
                list(inputs[contract.QUERY]), inputs[contract.EMBEDDING], list(inputs[FILTERS])
            )
        if self.metrics.enabled:  # added up here, sent once a second (serving.metrics)
            vector, lexical, empty = candidate_sources(
                candidates.rows,
                candidates.features,
                self.retriever.vector_pool,
                self.retriever.lexical_pool,
            )
            self.metrics.count(QUERIES, len(candidates.rows))
            self.metrics.count(CANDIDATES, vector, source="vector")
            self.metrics.count(CANDIDATES, lexical, source="lexical")
            self.metrics.count(EMPTY_RESULTS, empty)
        return {
            contract.CANDIDATE_ROWS: candidates.rows,
            contract.CANDIDATE_FEATURES: candidates.features,
            contract.RETRIEVAL_SCORES: candidates.retrieval_scores,
        }
