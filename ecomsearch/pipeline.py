"""The `search` ensemble's computation in one Python process, from the same model repository.

Used by benchmarks to isolate serving overhead (and handy for notebooks): the same tokenizer,
ONNX graphs, index, candidate code and top-k selection as the served models, without Triton.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        self,
        queries: Sequence[str],
        k: int = contract.DEFAULT_TOP_K,
        stage_cpu_s: dict[str, float] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The top `k` (product id, score) of each query. `stage_cpu_s`, when given, gains
        each stage's CPU time in seconds (this process's, so other work on the machine does
        not count), keyed by the served model that does that stage's work."""
        clock = _StageClock(stage_cpu_s)
        with clock(contract.PREPROCESS_MODEL):
            input_ids, attention_mask = self.encoder.tokenizer(list(queries))
        with clock(contract.ENCODER_MODEL):
            embeddings = self.encoder.encode_ids(input_ids, attention_mask)
        with clock(contract.RETRIEVE_MODEL):
            candidates = self.retriever.retrieve(queries, embeddings)
        with clock(contract.RANKER_MODEL):
            (scores,) = self.ranker.run(
                [contract.RANKING_SCORES], {contract.CANDIDATE_FEATURES: candidates.features}
            )
        with clock(contract.SELECT_MODEL):
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


class _StageClock:
    """Adds the CPU time of each `with clock(stage):` block to a dict, or does nothing."""

    def __init__(self, totals_s: dict[str, float] | None) -> None:
        self.totals_s = totals_s

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.totals_s is None:
            yield
            return
        start_s = time.process_time()
        try:
            yield
        finally:
            elapsed_s = time.process_time() - start_s
            self.totals_s[stage] = self.totals_s.get(stage, 0.0) + elapsed_s


__all__ = ["InProcessPipeline"]
