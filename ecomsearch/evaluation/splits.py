"""Query-grouped train/validation split: every judgment of a query lands on the same side."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_SEED = 13
DEFAULT_VALIDATION_FRACTION = 0.2


def is_validation_query(
    query: str, seed: int = DEFAULT_SEED, fraction: float = DEFAULT_VALIDATION_FRACTION
) -> bool:
    """Deterministic by content (a hash, not a shuffle), so it is stable across runs, machines
    and judgments files that share queries."""
    digest = hashlib.sha256(f"{seed}\0{query}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_queries(
    queries: Iterable[str],
    seed: int = DEFAULT_SEED,
    fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> tuple[list[str], list[str]]:
    """(train, validation), each in input order."""
    train, validation = [], []
    for query in queries:
        (validation if is_validation_query(query, seed, fraction) else train).append(query)
    return train, validation
