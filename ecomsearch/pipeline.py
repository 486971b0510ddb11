"""The `search` ensemble's computation in one Python process, from the same model repository.

Used by benchmarks to isolate serving overhead (and handy for notebooks): the same tokenizer,
ONNX graphs, index, candidate code and top-k selection as the served models, without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ecomsearch import contract
from ecomsearch.encoder import OnnxEncoder
from ecomsearch.index.store import CatalogIndex
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.candidates import HybridRetriever
from ecomsearch.serving.select import top_k_rows


class InProcessPipeline:
    def __init__(self, repository: Path | str, encoder_threads: int = 0) -> None:
        import onnxruntime as ort

        layout = ModelRepositoryLayout(Path(repository))
        self.encoder = OnnxEncoder(
            layout.encoder_onnx,
            layout.tokenizer_dir,
            max_length=contract.MAX_QUERY_TOKENS,
            intra_op_threads=encoder_threads,
        )
        index = CatalogIndex.load(layout.index_dir, encoder_fingerprint=self.encoder.fingerprint)
        self.index = index
        self.retriever = HybridRetriever(index, index.load_lexical())
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
        return [
            [
                (self.index.ids[row].decode("utf-8"), float(score))
                for row, score in zip(query_rows, query_scores, strict=True)
                if row >= 0
            ]
            for query_rows, query_scores in zip(rows, scores, strict=True)
        ]


__all__ = ["InProcessPipeline"]
