"""Top-k metrics of a recommendation against a basket: binary gain, truth = the basket's distinct
products (those the catalog knows count as much as the others: a product the shop could not
recommend is still a miss)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

CUTOFF = 20


def basket_metrics(ranked: Sequence[str], truth: set[str], k: int = CUTOFF) -> tuple[float, ...]:
    """(Recall@k = hits / min(|truth|, k), NDCG@k, HitRate@k) of one recommendation."""
    top = list(ranked)[:k]
    hits = [product in truth for product in top]
    found = sum(hits)
    recall = found / min(len(truth), k)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
    return recall, dcg / ideal, float(found > 0)


@dataclass(frozen=True)
class RecMetrics:
    baskets: int
    recall: float
    ndcg: float
    hit_rate: float
    k: int = CUTOFF

    @classmethod
    def of(cls, per_basket: Iterable[tuple[float, float, float]], k: int = CUTOFF) -> RecMetrics:
        rows = np.array(list(per_basket), dtype=np.float64).reshape(-1, 3)
        if not len(rows):
            return cls(0, 0.0, 0.0, 0.0, k)
        recall, ndcg, hit = rows.mean(axis=0)
        return cls(len(rows), float(recall), float(ndcg), float(hit), k)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "baskets": self.baskets,
            f"recall_at_{self.k}": self.recall,
            f"ndcg_at_{self.k}": self.ndcg,
            f"hit_rate_at_{self.k}": self.hit_rate,
        }
