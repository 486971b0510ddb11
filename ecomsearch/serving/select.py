"""The `select` model: the top-k candidates by a score, as product ids, scores and titles.

Fed the ranker's scores in `search`, and the retrieval stage's own scores in `search_unranked`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.index.store import CatalogIndex
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.selection import top_k_rows
from ecomsearch.serving.base import BatchedModel, RequestError, Tensors, input_array


def parse_top_k(raw: np.ndarray | None, batch: int) -> int:
    """The request's k: absent means the default; one value for every query of the request."""
    if raw is None:
        return contract.DEFAULT_TOP_K
    if raw.shape != (batch, 1):
        raise RequestError(
            f"input {contract.TOP_K!r} must have shape [{batch}, 1], got {raw.shape}"
        )
    values = np.unique(raw)
    if len(values) != 1:
        raise RequestError(f"{contract.TOP_K!r} must be the same for every query of a request")
    top_k = int(values[0])
    if not 1 <= top_k <= contract.MAX_TOP_K:
        raise RequestError(
            f"{contract.TOP_K!r} must be between 1 and {contract.MAX_TOP_K}, got {top_k}"
        )
    return top_k


class SelectModel(BatchedModel):
    def __init__(self, pb_utils, index: CatalogIndex) -> None:
        super().__init__(pb_utils)
        self.index = index

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> SelectModel:
        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        # The index `retrieve` serves: the latest version's, as the ensembles ask for.
        index = CatalogIndex.load(layout.index_dir, load_vectors=False)
        pb_utils.Logger.log_info(f"select: {index.count} products from {layout.index_dir}")
        return cls(pb_utils, index)

    def parse(self, request) -> Tensors:
        rows = input_array(self.pb_utils, request, contract.CANDIDATE_ROWS)
        scores = input_array(self.pb_utils, request, contract.CANDIDATE_SCORES)
        if rows is None or scores is None:
            raise RequestError(
                f"{contract.CANDIDATE_ROWS!r} and {contract.CANDIDATE_SCORES!r} are required"
            )
        if rows.ndim != 2 or rows.shape != scores.shape or rows.shape[1] == 0:
            raise RequestError(
                f"candidate rows {rows.shape} and scores {scores.shape} must be equal [batch, n]"
            )
        if rows.shape[1] > contract.MAX_CANDIDATES:
            raise RequestError(
                f"{rows.shape[1]} candidates a query; the maximum is {contract.MAX_CANDIDATES}"
            )
        # -1 pads a query with fewer candidates; any other row must name a product. (A negative
        # row would index the catalog from its end, or past it.)
        if rows.min(initial=-1) < -1 or rows.max(initial=-1) >= self.index.count:
            raise RequestError(
                f"candidate row out of range: each must be -1 (padding) or one of the "
                f"{self.index.count} products' rows, from 0"
            )
        if not np.isfinite(scores[rows >= 0]).all():
            raise RequestError("candidate scores must be finite (NaN or infinity found)")
        top_k = parse_top_k(input_array(self.pb_utils, request, contract.TOP_K), len(rows))
        return {
            contract.CANDIDATE_ROWS: rows,
            contract.CANDIDATE_SCORES: scores,
            contract.TOP_K: np.full(len(rows), top_k, dtype=np.int32),
        }

    def group_key(self, inputs: Tensors) -> Hashable:
        # Requests asking for different k run apart, so each run returns exactly its k columns.
        return super().group_key(inputs), int(inputs[contract.TOP_K][0])

    def run(self, inputs: Tensors) -> Tensors:
        k = int(inputs[contract.TOP_K][0])
        rows, scores = top_k_rows(
            inputs[contract.CANDIDATE_ROWS], inputs[contract.CANDIDATE_SCORES], k
        )
        ids, titles = self.index.labels(rows)
        # Fewer candidates than k (a tiny catalog): empty ids that clients skip.
        return {contract.PRODUCT_IDS: ids, contract.SCORES: scores, contract.TITLES: titles}
