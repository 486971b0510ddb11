"""The `retrieve` model: hybrid candidates (FAISS vectors + BM25) and their ranking features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.store import CatalogIndex
from ecomsearch.ranking.candidates import LEXICAL_POOL, VECTOR_POOL, HybridRetriever
from ecomsearch.ranking.features import FEATURE_NAMES
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    input_array,
    int_parameter,
    model_config,
    parameter,
    split_rows,
)
from ecomsearch.serving.preprocess import decode_queries


@dataclass(frozen=True)
class RetrieveRequest:
    queries: list[str]
    embeddings: np.ndarray  # [batch, dim] float32


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


def check_ranker_features(ranker_info: Path) -> dict[str, Any]:
    """The ranker must have been trained on the features this code computes, in this order."""
    if not ranker_info.is_file():
        raise RuntimeError(f"retrieve: {ranker_info} not found; train or restore the ranker")
    try:
        info = json.loads(ranker_info.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"retrieve: {ranker_info} is corrupt: {e}") from e
    if not isinstance(info, dict):
        raise RuntimeError(f"retrieve: {ranker_info} is corrupt: expected a JSON object")
    expected = info.get("feature_names")
    if expected != list(FEATURE_NAMES):
        raise RuntimeError(
            f"retrieve: the ranker ({ranker_info}) was trained on features {expected}, but this "
            f"version computes {list(FEATURE_NAMES)}; retrain it with `ecomsearch train-ranker`"
        )
    return info


class RetrieveModel(BatchedModel[RetrieveRequest]):
    def __init__(self, pb_utils, retriever: HybridRetriever) -> None:
        super().__init__(pb_utils)
        self.retriever = retriever
        self.dimension = retriever.index.manifest.dimension

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> RetrieveModel:
        import faiss

        config = model_config(args)
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / str(args["model_version"])
        index_dir = version_dir / parameter(config, "index_dir", "index")
        encoder_path = model_dir / parameter(
            config, "encoder_model", "../query_encoder/1/model.onnx"
        )
        if not encoder_path.is_file():
            raise RuntimeError(f"retrieve: encoder model {encoder_path} not found")
        ranker_info = check_ranker_features(
            model_dir / parameter(config, "ranker_info", "../ranker/1/ranker.json")
        )
        (embedding_config,) = [i for i in config["input"] if i["name"] == contract.EMBEDDING]
        index = CatalogIndex.load(
            index_dir,
            encoder_fingerprint=file_sha256(encoder_path),
            dimension=int(embedding_config["dims"][-1]),
        )
        lexical = index.load_lexical()
        # One thread per instance: FAISS's OpenMP fan-out costs more than it saves on the few
        # queries of a dynamic batch (54k-product flat search: 8 ms with 2 threads, 3.5 ms with
        # 1), and the encoder needs the other core.
        faiss.omp_set_num_threads(int_parameter(config, "faiss_omp_threads", 1, 1))
        index.faiss_index, index.gpu_resources = place_on_device(
            index.faiss_index,
            args["model_instance_kind"],
            int(args["model_instance_device_id"]),
            faiss,
        )
        retriever = HybridRetriever(
            index,
            lexical,
            vector_pool=int_parameter(config, "vector_pool", VECTOR_POOL, 1),
            lexical_pool=int_parameter(config, "lexical_pool", LEXICAL_POOL, 1),
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
        return cls(pb_utils, retriever)

    def parse(self, request) -> RetrieveRequest:
        embeddings = input_array(self.pb_utils, request, contract.EMBEDDING)
        if embeddings is None:
            raise RequestError(f"input {contract.EMBEDDING!r} is required")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dimension:
            raise RequestError(
                f"input {contract.EMBEDDING!r} must have shape [batch, {self.dimension}], "
                f"got {embeddings.shape}"
            )
        queries = decode_queries(
            input_array(self.pb_utils, request, contract.QUERY), contract.MAX_QUERY_BYTES
        )
        if len(queries) != len(embeddings):
            raise RequestError(f"{len(queries)} queries but {len(embeddings)} embeddings")
        return RetrieveRequest(queries, embeddings.astype(np.float32, copy=False))

    def run(self, parsed: list[RetrieveRequest]) -> list[dict[str, np.ndarray]]:
        candidates = self.retriever.retrieve(
            [q for request in parsed for q in request.queries],
            np.concatenate([request.embeddings for request in parsed]),
        )
        counts = [len(request.queries) for request in parsed]
        return [
            {
                contract.CANDIDATE_ROWS: rows,
                contract.CANDIDATE_FEATURES: features,
                contract.RETRIEVAL_SCORES: scores,
            }
            for rows, features, scores in zip(
                split_rows(candidates.rows, counts),
                split_rows(candidates.features, counts),
                split_rows(candidates.retrieval_scores, counts),
                strict=True,
            )
        ]
