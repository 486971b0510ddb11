"""TREC formats, per-query scores and paired significance tests: evaluation others can check.

- qrels: `qid 0 docid relevance` per line (trec_eval, ranx, ir_datasets); with a topics file
  (`qid<TAB>query text`, the MS MARCO / ir_datasets TSV) it is a judgments file like the CSV.
- run: `qid Q0 docid rank score run_name` per line, best first.
- per-query scores: one row per query and metric, so a reader can find where two systems differ.
- paired tests on per-query scores: a two-sided randomisation (sign-flip) test, the one Smucker,
  Allan and Carterette (CIKM 2007) recommend for IR, and Student's paired t-test beside it.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ecomsearch.evaluation.metrics import (
    MRR_CUTOFF,
    NDCG_CUTOFF,
    RECALL_CUTOFF,
    Judgments,
    JudgmentsError,
    ndcg_at,
    recall_at,
    reciprocal_rank_at,
)

METRICS = (f"ndcg@{NDCG_CUTOFF}", f"recall@{RECALL_CUTOFF}", f"mrr@{MRR_CUTOFF}")
PERMUTATIONS = 10_000
# Grades written with two decimals are exact to half a hundredth.
GRADE_PRECISION = 0.005 + 1e-9


class TrecFormatError(ValueError):
    """A qrels, topics or run file that is not in its TREC format; the message names the line."""


def query_ids(queries: Sequence[str]) -> dict[str, str]:
    """query text -> a TREC qid for judgments that have none (the CSV): its 1-based position."""
    return {query: str(i) for i, query in enumerate(queries, start=1)}


def read_topics(path: Path) -> dict[str, str]:
    """qid -> query text from `qid<TAB>text` lines (blank lines skipped)."""
    topics: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        qid, sep, text = line.partition("\t")
        text = " ".join(text.split())
        if not sep or not qid.strip() or not text:
            raise TrecFormatError(f"{path}: line {number}: expected `qid<TAB>query text`")
        topics[qid.strip()] = text
    return topics


def read_qrels(path: Path, topics: Mapping[str, str]) -> Judgments:
    """Judgments from a qrels file, each qid named by its topic's text; every qid of the qrels
    must have a topic. Grades are the file's relevance values as they are."""
    grades: dict[str, dict[str, float]] = defaultdict(dict)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise TrecFormatError(f"{path}: line {number}: expected `qid iteration docid rel`")
        qid, _, docid, relevance = fields
        try:
            grade = float(relevance)
        except ValueError:
            raise TrecFormatError(f"{path}: line {number}: relevance {relevance!r}") from None
        if qid not in topics:
            raise TrecFormatError(f"{path}: line {number}: qid {qid!r} has no topic")
        grades[topics[qid]][docid] = grade
    if not grades:
        raise JudgmentsError(f"{path}: no judgments")
    values = [g for by_doc in grades.values() for g in by_doc.values()]
    if min(values) == max(values):
        raise JudgmentsError(f"{path}: every judgment has grade {min(values)}; nothing to rank")
    return Judgments(dict(grades), min(values), max(values))


def integer_gain_scale(judgments: Judgments, largest: int = 12) -> int:
    """The smallest factor that makes every gain a whole number, for qrels that trec_eval reads.
    Grades that are means of raters are usually written rounded (2.33 for 7/3): within that
    rounding (GRADE_PRECISION) they count as whole after scaling by 3. NDCG and the relevance
    threshold are unchanged by a common factor, so the written qrels score as the judgments do,
    to the grades' written precision."""
    gains = [g - judgments.lowest for by in judgments.grades.values() for g in by.values()]
    for scale in range(1, largest + 1):
        if all(abs(g * scale - round(g * scale)) <= GRADE_PRECISION * scale for g in gains):
            return scale
    raise ValueError(f"no factor up to {largest} makes every gain a whole number")


def write_qrels(path: Path, judgments: Judgments, qids: Mapping[str, str]) -> int:
    """Writes the judgments as qrels of integer gains (see integer_gain_scale) and returns the
    scale; with it, a qrels relevance at least scale * relevant_gain is "relevant"."""
    scale = integer_gain_scale(judgments)
    with path.open("w", encoding="utf-8") as out:
        for query, by_product in judgments.grades.items():
            for pid, grade in by_product.items():
                out.write(f"{qids[query]} 0 {pid} {round((grade - judgments.lowest) * scale)}\n")
    return scale


def write_topics(path: Path, qids: Mapping[str, str]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for query, qid in qids.items():
            out.write(f"{qid}\t{query}\n")


@dataclass(frozen=True)
class RankedHit:
    product_id: str
    score: float


def write_run(
    path: Path, rankings: Mapping[str, Sequence[RankedHit]], qids: Mapping[str, str], name: str
) -> None:
    """A TREC run; ranks are positions in the served order. Tools re-sort by score, so a score
    that does not fall below the previous one (a served tie) is nudged down by a millionth: the
    file then reads back in exactly the served order."""
    with path.open("w", encoding="utf-8") as out:
        for query, hits in rankings.items():
            previous = math.inf
            for rank, hit in enumerate(hits, start=1):
                # Compared as written: two scores that differ only beyond nine digits are a tie.
                score = float(f"{hit.score:.9g}")
                if not score < previous:
                    score = float(f"{previous - 1e-6 * max(1.0, abs(previous)):.9g}")
                out.write(f"{qids[query]} Q0 {hit.product_id} {rank} {score:.9g} {name}\n")
                previous = score


def read_run(path: Path) -> dict[str, list[str]]:
    """qid -> docids best first, ordered by score (descending) as trec_eval orders them, ties
    by docid descending (trec_eval's rule)."""
    entries: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise TrecFormatError(f"{path}: line {number}: expected `qid Q0 docid rank score run`")
        try:
            score = float(fields[4])
        except ValueError:
            raise TrecFormatError(f"{path}: line {number}: score {fields[4]!r}") from None
        entries[fields[0]].append((score, fields[2]))
    return {
        qid: [doc for _, doc in sorted(hits, key=lambda h: (h[0], h[1]), reverse=True)]
        for qid, hits in entries.items()
    }


def per_query_scores(
    rankings: Mapping[str, Sequence[str]], judgments: Judgments
) -> dict[str, dict[str, float]]:
    """metric -> query -> score over the evaluable queries (the means are `evaluate`'s)."""
    scores: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
    for query in judgments.evaluable_queries():
        gains = judgments.gains(query)
        relevant = {pid for pid, g in gains.items() if g >= judgments.relevant_gain}
        ranked = rankings.get(query, ())
        scores[METRICS[0]][query] = ndcg_at(ranked, gains)
        scores[METRICS[1]][query] = recall_at(ranked, relevant)
        scores[METRICS[2]][query] = reciprocal_rank_at(ranked, relevant)
    return scores


def write_per_query(
    path: Path, stages: Mapping[str, Mapping[str, Mapping[str, float]]], qids: Mapping[str, str]
) -> None:
    """TSV `stage metric qid query score`, one row per (stage, metric, query)."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(["stage", "metric", "qid", "query", "score"])
        for stage, by_metric in stages.items():
            for metric, by_query in by_metric.items():
                for query, score in by_query.items():
                    writer.writerow([stage, metric, qids[query], query, f"{score:.6f}"])


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    queries: int
    mean_a: float
    mean_b: float
    mean_difference: float  # b - a
    randomization_p: float
    t_test_p: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def randomization_p_value(
    differences: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0
) -> float:
    """Two-sided paired randomisation test: the share of random sign flips of the per-query
    differences whose mean is at least as far from 0 as the observed one (the observed
    assignment counted, so p is never 0)."""
    differences = np.asarray(differences, dtype=np.float64)
    if not len(differences) or not np.any(differences):
        return 1.0
    rng = np.random.default_rng(seed)
    observed = abs(differences.mean())
    extreme = 0
    for start in range(0, permutations, 1000):
        count = min(1000, permutations - start)
        signs = rng.choice((-1.0, 1.0), size=(count, len(differences)))
        extreme += int((np.abs(signs @ differences) / len(differences) >= observed - 1e-12).sum())
    return (extreme + 1) / (permutations + 1)


def compare_paired(
    scores_a: Mapping[str, float], scores_b: Mapping[str, float], metric: str, seed: int = 0
) -> PairedComparison:
    """Compares two systems on the queries both were scored on."""
    from scipy import stats

    queries = sorted(set(scores_a) & set(scores_b))
    if not queries:
        raise ValueError("the two runs share no scored query")
    a = np.array([scores_a[q] for q in queries])
    b = np.array([scores_b[q] for q in queries])
    differences = b - a
    t_p = float(stats.ttest_rel(b, a).pvalue) if np.any(differences) else 1.0
    return PairedComparison(
        metric,
        len(queries),
        float(a.mean()),
        float(b.mean()),
        float(differences.mean()),
        randomization_p_value(differences, seed=seed),
        t_p if math.isfinite(t_p) else 1.0,
    )
