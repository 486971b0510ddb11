"""Query text as the service accepts it: the one place that decodes and validates a [batch, 1]
BYTES tensor of queries, for every model that receives them (`preprocess`, `retrieve`)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

import numpy as np

from ecomsearch import contract
from ecomsearch.errors import RequestError


def visible_text(text: str) -> str:
    """The query as it is searched: control characters (NUL, tabs, newlines) count as spaces,
    invisible format characters (zero-width spaces and joiners, byte-order marks, bidi marks) are
    dropped, and whitespace runs collapse to one space. Empty means nothing to search for."""
    if not text.isprintable():  # fast path: a printable string has no control or format chars
        kept = []
        for char in text:
            category = unicodedata.category(char)
            if category == "Cc":
                kept.append(" ")
            elif category not in ("Cf", "Cs", "Co", "Cn"):
                kept.append(char)
        text = "".join(kept)
    return " ".join(text.split())


def _normalise(data: bytes, row: int) -> str:
    """UTF-8 bytes to the query text, whitespace collapsed; raises RequestError naming `row`."""
    if len(data) > contract.MAX_QUERY_BYTES:
        raise RequestError(
            f"query {row} is {len(data)} bytes; the maximum is {contract.MAX_QUERY_BYTES}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"query {row} is not valid UTF-8 ({e.reason})") from None
    text = visible_text(text)
    if not text:
        raise RequestError(f"query {row} is empty or only whitespace and invisible characters")
    return text


def decode_queries(raw: np.ndarray | None) -> list[str]:
    """Validates a [batch, 1] BYTES tensor of queries against the contract's limits; raises
    RequestError naming the bad row."""
    if raw is None:
        raise RequestError(f"input {contract.QUERY!r} is required")
    if raw.ndim != 2 or raw.shape[1] != 1 or raw.shape[0] == 0:
        raise RequestError(f"input {contract.QUERY!r} must have shape [batch, 1], got {raw.shape}")
    return [
        _normalise(value if isinstance(value, bytes) else str(value).encode("utf-8"), row)
        for row, value in enumerate(raw[:, 0])
    ]


def queries_array(queries: Iterable[str]) -> np.ndarray:
    """[n] object array of query strings: how decoded queries travel through a batched model."""
    queries = list(queries)
    array = np.empty(len(queries), dtype=object)
    array[:] = queries
    return array
