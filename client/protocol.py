"""Building `search` requests and reading its responses; shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ecomsearch import contract
from ecomsearch.client.errors import BadRequestError
from ecomsearch.query import visible_text

OUTPUTS = (contract.PRODUCT_IDS, contract.SCORES, contract.TITLES)


@dataclass(frozen=True)
class Hit:
    product_id: str
    score: float
    title: str


def validate(queries: Sequence[str], k: int) -> None:
    """Rejects what the server would reject, before anything is sent."""
    if isinstance(queries, str):
        raise BadRequestError("expected a sequence of queries, got one string")
    if not queries:
        raise BadRequestError("no queries given")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= contract.MAX_TOP_K:
        raise BadRequestError(f"k must be an integer between 1 and {contract.MAX_TOP_K}, got {k!r}")
    for position, query in enumerate(queries):
        # The server's own rule, so a query of zero-width spaces fails here, not after a trip.
        if not isinstance(query, str) or not visible_text(query):
            raise BadRequestError(f"query {position} must be a string with something to search")
        if len(query.encode("utf-8")) > contract.MAX_QUERY_BYTES:
            raise BadRequestError(
                f"query {position} is longer than {contract.MAX_QUERY_BYTES} bytes"
            )


def chunks(queries: Sequence[str]) -> list[Sequence[str]]:
    """Splits a long list into requests of at most MAX_QUERIES_PER_REQUEST queries."""
    size = contract.MAX_QUERIES_PER_REQUEST
    return [queries[start : start + size] for start in range(0, len(queries), size)]


def build_inputs(grpc_module, queries: Sequence[str], k: int) -> list:
    """InferInputs for one request (`grpc_module` is tritonclient.grpc or its aio variant)."""
    query = grpc_module.InferInput(contract.QUERY, [len(queries), 1], "BYTES")
    query.set_data_from_numpy(np.array([[q.encode("utf-8")] for q in queries], dtype=np.object_))
    top_k = grpc_module.InferInput(contract.TOP_K, [len(queries), 1], "INT32")
    top_k.set_data_from_numpy(np.full((len(queries), 1), k, dtype=np.int32))
    return [query, top_k]


def build_outputs(grpc_module) -> list:
    return [grpc_module.InferRequestedOutput(name) for name in OUTPUTS]


def parse_hits(result) -> list[list[Hit]]:
    """One list of hits per query; empty ids (slots an approximate index left unfilled) skipped."""
    ids, scores, titles = (result.as_numpy(name) for name in OUTPUTS)
    return [
        [
            Hit(product_id.decode("utf-8"), float(score), title.decode("utf-8"))
            for product_id, score, title in zip(row_ids, row_scores, row_titles, strict=True)
            if product_id
        ]
        for row_ids, row_scores, row_titles in zip(ids, scores, titles, strict=True)
    ]


class SearchClientBase:
    """What the sync and asyncio clients share: address, deadline, model, requested outputs."""

    def __init__(self, url: str, timeout_s: float, model_name: str, client) -> None:
        import tritonclient.grpc as grpcclient

        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._grpc = grpcclient
        self.url = url
        self.timeout_s = timeout_s
        self.model_name = model_name
        self._client = client
        self._outputs = build_outputs(grpcclient)
