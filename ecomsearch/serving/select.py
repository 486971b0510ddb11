"""The `select` model: the top-k candidates by a score, as product ids, scores and titles.

Fed the ranker's scores in `search`, and the retrieval stage's own scores in `search_unranked`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
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
class SelectRequest:
    rows: np.ndarray  # [batch, candidates] int64, -1 pads
    scores: np.ndarray  # [batch, candidates] float32
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


def top_k_rows(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best-scoring candidate rows (padding never wins), best first; ties go to
    the earlier candidate, so a request's answer does not depend on the k of its neighbours."""
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    # A full stable sort of a few hundred scores costs microseconds and is deterministic.
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, best, axis=1), np.take_along_axis(scores, best, axis=1)


class SelectModel(BatchedModel[SelectRequest]):
    def __init__(self, pb_utils, index: CatalogIndex, max_top_k: int) -> None:
        super().__init__(pb_utils)
        self.index = index
        self.max_top_k = max_top_k

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> SelectModel:
        config = model_config(args)
        model_dir = Path(args["model_repository"])
        index_dir = model_dir / parameter(config, "index_dir", "../retrieve/1/index")
        index = CatalogIndex.load(index_dir, load_vectors=False)
        max_top_k = int_parameter(config, "max_top_k", contract.MAX_TOP_K, 1)
        pb_utils.Logger.log_info(f"select: {index.count} products from {index_dir}")
        return cls(pb_utils, index, max_top_k)

    def parse(self, request) -> SelectRequest:
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
        if rows.max(initial=-1) >= self.index.count:
            raise RequestError(f"candidate row out of range for {self.index.count} products")
        top_k = parse_top_k(
            input_array(self.pb_utils, request, contract.TOP_K), len(rows), self.max_top_k
        )
        return SelectRequest(rows, scores, top_k)

    def run(self, parsed: list[SelectRequest]) -> list[dict[str, np.ndarray]]:
        widths = {request.rows.shape[1] for request in parsed}
        if len(widths) == 1:  # the usual case: one vectorised pass over every request
            rows, scores = top_k_rows(
                np.concatenate([r.rows for r in parsed]),
                np.concatenate([r.scores for r in parsed]),
                max(r.top_k for r in parsed),
            )
            pieces = zip(
                split_rows(rows, [len(r.rows) for r in parsed]),
                split_rows(scores, [len(r.rows) for r in parsed]),
                strict=True,
            )
        else:
            pieces = (top_k_rows(r.rows, r.scores, r.top_k) for r in parsed)
        outputs = []
        for request, (rows, scores) in zip(parsed, pieces, strict=True):
            rows, scores = rows[:, : request.top_k], scores[:, : request.top_k].copy()
            ids, titles = self.index.ids[rows], self.index.titles[rows]
            # Fewer candidates than k (a tiny catalog): empty ids that clients skip.
            missing = rows < 0
            if missing.any():
                ids[missing], titles[missing], scores[missing] = b"", b"", -np.inf
            outputs.append(
                {contract.PRODUCT_IDS: ids, contract.SCORES: scores, contract.TITLES: titles}
            )
        return outputs
