"""The `retrieve` model: hybrid candidates (FAISS vectors + BM25) and their ranking features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.paths import INDEX_DIR, ModelRepositoryLayout
from ecomsearch.query import decode_queries, queries_array
from ecomsearch.ranking.candidates import LEXICAL_POOL, VECTOR_POOL, HybridRetriever, open_retriever
from ecomsearch.ranking.features import check_ranker_features
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
)


@dataclass(frozen=True)
class RetrieveSettings:
    """The `parameters` of retrieve's config.pbtxt, with their defaults."""

    vector_pool: int = VECTOR_POOL
    lexical_pool: int = LEXICAL_POOL
    # One thread per instance: FAISS's OpenMP fan-out costs more than it saves on the few
    # queries of a dynamic batch (54k-product flat search: 8 ms with 2 threads, 3.5 ms with 1),
    # and the encoder needs the other core.
    faiss_omp_threads: int = 1

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RetrieveSettings:
        return cls(
            vector_pool=int_parameter(config, "vector_pool", cls.vector_pool, 1),
            lexical_pool=int_parameter(config, "lexical_pool", cls.lexical_pool, 1),
            faiss_omp_threads=int_parameter(config, "faiss_omp_threads", cls.faiss_omp_threads, 1),
        )


def place_on_device(faiss_index: Any, instance_kind: str, device_id: int, faiss_module: Any):
    """Moves the index to this instance's own GPU for KIND_GPU instances.

    Returns (index, gpu_resources); the resources must outlive the index. Graph indexes (HNSW)
    have no FAISS GPU implementation and stay on the CPU.
    """
    if instance_kind != "GPU":
        return faiss_index, None
    if not hasattr(faiss_module, "StandardGpuResources"):
        raise RuntimeError(
            "this instance is KIND_GPU but the installed faiss has no GPU support; "
            "install faiss-gpu"
        )
    if isinstance(faiss_index, faiss_module.IndexHNSWFlat):
        return faiss_index, None
    resources = faiss_module.StandardGpuResources()
    return faiss_module.index_cpu_to_gpu(resources, device_id, faiss_index), resources


class RetrieveModel(BatchedModel):
    def __init__(self, pb_utils, retriever: HybridRetriever, gpu_resources: Any = None) -> None:
        super().__init__(pb_utils)
        self.retriever = retriever
        self.dimension = retriever.index.manifest.dimension
        # faiss.StandardGpuResources of an index moved to a GPU: it must live as long as it.
        self.gpu_resources = gpu_resources

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> RetrieveModel:
        import faiss

        config = model_config(args)
        settings = RetrieveSettings.from_config(config)
        layout, version_dir = ModelRepositoryLayout.of_triton_model(args)
        ranker_info = check_ranker_features(layout.ranker_info)
        (embedding_config,) = [i for i in config["input"] if i["name"] == contract.EMBEDDING]
        retriever = open_retriever(
            version_dir / INDEX_DIR,
            layout.encoder_onnx,
            vector_pool=settings.vector_pool,
            lexical_pool=settings.lexical_pool,
            dimension=int(embedding_config["dims"][-1]),
        )
        faiss.omp_set_num_threads(settings.faiss_omp_threads)
        index = retriever.index
        index.faiss_index, gpu_resources = place_on_device(
            index.faiss_index,
            args["model_instance_kind"],
            int(args["model_instance_device_id"]),
            faiss,
        )
        trained_pools = ranker_info.get("candidate_pools")
        served_pools = {"vector": retriever.vector_pool, "lexical": retriever.lexical_pool}
        if trained_pools is not None and trained_pools != served_pools:
            # Rank features encode "not retrieved" as the pool size: other pools shift them.
            pb_utils.Logger.log_warn(
                f"retrieve: candidate pools {served_pools} differ from the ranker's training "
                f"pools {trained_pools}; rank features will be off its training distribution"
            )
        manifest = index.manifest
        pb_utils.Logger.log_info(
            f"retrieve: {manifest.count} products, {manifest.index_type} index + BM25, "
            f"{retriever.width} candidates a query, instance {args['model_instance_name']} on "
            f"{args['model_instance_kind']} {args['model_instance_device_id']}"
        )
        return cls(pb_utils, retriever, gpu_resources)

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
        }

    def run(self, inputs: Tensors) -> Tensors:
        candidates = self.retriever.retrieve(
            list(inputs[contract.QUERY]), inputs[contract.EMBEDDING]
        )
        return {
            contract.CANDIDATE_ROWS: candidates.rows,
            contract.CANDIDATE_FEATURES: candidates.features,
            contract.RETRIEVAL_SCORES: candidates.retrieval_scores,
        }
