"""Ranking metrics over graded judgments.

Gains are linear: relevance minus the lowest grade of the judgments file, so the lowest grade
(irrelevant) gains 0, and so does any product nobody judged. A product is *relevant* when its
gain is at least half the scale; only queries with at least one relevant judged product count.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

NDCG_CUTOFF = 10
RECALL_CUTOFF = 100
MRR_CUTOFF = 10


class JudgmentsError(ValueError):
    """The judgments file is malformed; the message names the line."""


@dataclass(frozen=True)
class Judgments:
    """query -> product id -> relevance grade, plus the grade scale of the whole file."""

    grades: dict[str, dict[str, float]]
    lowest: float
    highest: float

    @property
    def relevant_gain(self) -> float:
        return (self.highest - self.lowest) / 2

    def gains(self, query: str) -> dict[str, float]:
        return {pid: grade - self.lowest for pid, grade in self.grades[query].items()}

    def evaluable_queries(self) -> list[str]:
        """Queries with at least one relevant judged product, in file order."""
        return [
            q for q in self.grades if any(g >= self.relevant_gain for g in self.gains(q).values())
        ]

    def restricted_to(self, queries: Iterable[str]) -> Judgments:
        keep = set(queries)
        return Judgments(
            {q: g for q, g in self.grades.items() if q in keep}, self.lowest, self.highest
        )


def read_judgments(path: Path | str) -> Judgments:
    """CSV with header `query,product_id,relevance`; a repeated pair keeps its last grade."""
    grades: dict[str, dict[str, float]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = {"query", "product_id", "relevance"} - set(reader.fieldnames or ())
        if missing:
            raise JudgmentsError(f"{path}: header lacks {sorted(missing)}")
        for line_number, row in enumerate(reader, start=2):
            query = " ".join((row["query"] or "").split())
            product_id = (row["product_id"] or "").strip()
            try:
                grade = float(row["relevance"])
            except (TypeError, ValueError):
                raise JudgmentsError(
                    f"{path}: line {line_number}: relevance {row['relevance']!r} is not a number"
                ) from None
            if not query or not product_id or not math.isfinite(grade):
                raise JudgmentsError(f"{path}: line {line_number}: empty query, id or grade")
            grades[query][product_id] = grade
    if not grades:
        raise JudgmentsError(f"{path}: no judgments")
    all_grades = [g for by_product in grades.values() for g in by_product.values()]
    lowest, highest = min(all_grades), max(all_grades)
    if highest == lowest:
        raise JudgmentsError(f"{path}: every judgment has grade {lowest}; nothing to rank")
    return Judgments(dict(grades), lowest, highest)


def dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


def ndcg_at(ranked: Sequence[str], gains: Mapping[str, float], cutoff: int = NDCG_CUTOFF) -> float:
    ideal = dcg(sorted(gains.values(), reverse=True)[:cutoff])
    if ideal <= 0:
        return 0.0
    return dcg([gains.get(pid, 0.0) for pid in ranked[:cutoff]]) / ideal


def recall_at(ranked: Sequence[str], relevant: set[str], cutoff: int = RECALL_CUTOFF) -> float:
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:cutoff])) / len(relevant)


def reciprocal_rank_at(
    ranked: Sequence[str], relevant: set[str], cutoff: int = MRR_CUTOFF
) -> float:
    for rank, pid in enumerate(ranked[:cutoff], start=1):
        if pid in relevant:
            return 1.0 / rank
    return 0.0


@dataclass(frozen=True)
class Metrics:
    ndcg_at_10: float
    recall_at_100: float
    mrr_at_10: float
    queries: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluate(rankings: Mapping[str, Sequence[str]], judgments: Judgments) -> Metrics:
    """Mean metrics over the evaluable queries; a query without a ranking scores 0."""
    queries = judgments.evaluable_queries()
    if not queries:
        raise JudgmentsError("no query has a relevant judged product")
    ndcg = recall = mrr = 0.0
    for query in queries:
        gains = judgments.gains(query)
        relevant = {pid for pid, g in gains.items() if g >= judgments.relevant_gain}
        ranked = rankings.get(query, ())
        ndcg += ndcg_at(ranked, gains)
        recall += recall_at(ranked, relevant)
        mrr += reciprocal_rank_at(ranked, relevant)
    n = len(queries)
    return Metrics(ndcg / n, recall / n, mrr / n, n)
