"""The `search` ensemble's computation in one Python process, from the same model repository.

Used by benchmarks to isolate serving overhead (and handy for notebooks): the same tokenizer,
ONNX graphs, index, candidate code and top-k selection as the served models, without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ecomsearch import contract
from ecomsearch.encoder import OnnxEncoder
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.candidates import open_retriever
from ecomsearch.ranking.features import check_ranker_features
from ecomsearch.ranking.selection import top_k_rows


class InProcessPipeline:
    def __init__(
        self, repository: Path | str, encoder_threads: int = 0, profile: str | None = None
    ) -> None:
        """`profile`: the model-config profile whose encoder file to run (None: the default,
        CPU one, as `ecomsearch serve` without --model-config-name; "gpu": the float32 encoder
        on CUDA, retrieval and ranking on the CPU as the served GPU profile's ranker)."""
        import onnxruntime as ort

        layout = ModelRepositoryLayout(Path(repository))
        providers = ["CPUExecutionProvider"]
        if profile == "gpu":
            providers.insert(0, "CUDAExecutionProvider")
        self.encoder = OnnxEncoder(
            layout.served_model_file(contract.ENCODER_MODEL, profile),
            layout.tokenizer_dir,
            max_length=contract.MAX_QUERY_TOKENS,
            intra_op_threads=encoder_threads,
            providers=providers,
        )
        check_ranker_features(layout.ranker_info)
        self.retriever = open_retriever(layout.index_dir, layout.encoder_onnx)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.ranker = ort.InferenceSession(
            str(layout.ranker_onnx), options, providers=["CPUExecutionProvider"]
        )

    def search(
        self, queries: Sequence[str], k: int = contract.DEFAULT_TOP_K
    ) -> list[list[tuple[str, float]]]:
        input_ids, attention_mask = self.encoder.tokenizer(list(queries))
        embeddings = self.encoder.encode_ids(input_ids, attention_mask)
        candidates = self.retriever.retrieve(queries, embeddings)
        (scores,) = self.ranker.run(
            [contract.RANKING_SCORES], {contract.CANDIDATE_FEATURES: candidates.features}
        )
        rows, scores = top_k_rows(candidates.rows, scores, k)
        ids = self.retriever.catalog.product_ids_of_keys(rows)
        return [
            [
                (product_id.decode("utf-8"), float(score))
                for product_id, score in zip(query_ids, query_scores, strict=True)
                if product_id
            ]
            for query_ids, query_scores in zip(ids, scores, strict=True)
        ]


__all__ = ["InProcessPipeline"]
