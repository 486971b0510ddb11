"""The `retrieve` model: FAISS top-k over the catalog index for each query embedding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.store import CatalogIndex
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    input_array,
    int_parameter,
    model_config,
    parameter,
    split_rows,
)


@dataclass(frozen=True)
class RetrieveRequest:
    embeddings: np.ndarray  # [batch, dim] float32
    top_k: int


def parse_top_k(raw: np.ndarray | None, batch: int, max_top_k: int) -> int:
    """The request's k: absent means the default; one value for every query of the request."""
    if raw is None:
        return min(contract.DEFAULT_TOP_K, max_top_k)
    if raw.shape != (batch, 1):
        raise RequestError(
            f"input {contract.TOP_K!r} must have shape [{batch}, 1], got {raw.shape}"
        )
    values = np.unique(raw)
    if len(values) != 1:
        raise RequestError(f"{contract.TOP_K!r} must be the same for every query of a request")
    top_k = int(values[0])
    if not 1 <= top_k <= max_top_k:
        raise RequestError(f"{contract.TOP_K!r} must be between 1 and {max_top_k}, got {top_k}")
    return top_k


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


class RetrieveModel(BatchedModel[RetrieveRequest]):
    def __init__(self, pb_utils, index: CatalogIndex, max_top_k: int = contract.MAX_TOP_K) -> None:
        super().__init__(pb_utils)
        self.index = index
        self.max_top_k = max_top_k

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
        (embedding_config,) = [i for i in config["input"] if i["name"] == contract.EMBEDDING]
        index = CatalogIndex.load(
            index_dir,
            encoder_fingerprint=file_sha256(encoder_path),
            dimension=int(embedding_config["dims"][-1]),
        )
        index.faiss_index, index.gpu_resources = place_on_device(
            index.faiss_index,
            args["model_instance_kind"],
            int(args["model_instance_device_id"]),
            faiss,
        )
        max_top_k = int_parameter(config, "max_top_k", contract.MAX_TOP_K, 1)
        manifest = index.manifest
        pb_utils.Logger.log_info(
            f"retrieve: {manifest.count} products, {manifest.index_type} index, "
            f"instance {args['model_instance_name']} on {args['model_instance_kind']} "
            f"{args['model_instance_device_id']}"
        )
        return cls(pb_utils, index, max_top_k)

    def parse(self, request) -> RetrieveRequest:
        embeddings = input_array(self.pb_utils, request, contract.EMBEDDING)
        if embeddings is None:
            raise RequestError(f"input {contract.EMBEDDING!r} is required")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.index.manifest.dimension:
            raise RequestError(
                f"input {contract.EMBEDDING!r} must have shape [batch, "
                f"{self.index.manifest.dimension}], got {embeddings.shape}"
            )
        top_k = parse_top_k(
            input_array(self.pb_utils, request, contract.TOP_K), len(embeddings), self.max_top_k
        )
        return RetrieveRequest(embeddings.astype(np.float32, copy=False), top_k)

    def run(self, parsed: list[RetrieveRequest]) -> list[dict[str, np.ndarray]]:
        embeddings = np.concatenate([p.embeddings for p in parsed])
        scores, rows = self.index.search(embeddings, max(p.top_k for p in parsed))
        counts = [len(p.embeddings) for p in parsed]
        outputs = []
        for request, request_scores, request_rows in zip(
            parsed, split_rows(scores, counts), split_rows(rows, counts), strict=True
        ):
            request_scores = request_scores[:, : request.top_k].astype(np.float32)
            request_rows = request_rows[:, : request.top_k]
            ids, titles = self.index.ids[request_rows], self.index.titles[request_rows]
            # An approximate index may find fewer than k neighbours (FAISS pads with row -1):
            # those slots are empty ids that clients skip, never another product.
            missing = request_rows < 0
            if missing.any():
                ids[missing], titles[missing], request_scores[missing] = b"", b"", -np.inf
            outputs.append(
                {
                    contract.PRODUCT_IDS: ids,
                    contract.SCORES: request_scores,
                    contract.TITLES: titles,
                }
            )
        return outputs
