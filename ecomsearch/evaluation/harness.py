"""`ecomsearch eval`: relevance of the served pipeline on a catalog and its judgments.

Every distinct query goes through the real `search` ensemble (and `search_unranked`, the same
pipeline without the ranker) over gRPC; nothing is re-implemented here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecomsearch import contract
from ecomsearch.evaluation.metrics import (
    MRR_CUTOFF,
    NDCG_CUTOFF,
    RECALL_CUTOFF,
    Judgments,
    Metrics,
    evaluate,
    read_judgments,
)
from ecomsearch.evaluation.splits import (
    DEFAULT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    split_queries,
)
from ecomsearch.evaluation.trec import (
    METRICS,
    PairedComparison,
    RankedHit,
    compare_paired,
    per_query_scores,
    query_ids,
    write_per_query,
    write_qrels,
    write_run,
    write_topics,
)

log = logging.getLogger(__name__)

STAGES = {"retrieval": contract.SEARCH_UNRANKED_MODEL, "ranked": contract.SEARCH_MODEL}
REQUEST_QUERIES = contract.MAX_QUERIES_PER_REQUEST


def select_queries(judgments: Judgments, split: str, seed: int, fraction: float) -> list[str]:
    queries = list(judgments.grades)
    if split == "all":
        return queries
    train, validation = split_queries(queries, seed, fraction)
    return validation if split == "validation" else train


def collect_rankings(
    url: str,
    model_name: str,
    queries: Sequence[str],
    k: int,
    progress: bool = True,
    rerank_depth: int | None = None,
) -> tuple[dict[str, list[RankedHit]], float]:
    """query -> served hits (best first), and the seconds it took; `rerank_depth` is sent
    with every search (the ranked `search` only)."""
    from ecomsearch.client import SearchClient

    chunks = [queries[i : i + REQUEST_QUERIES] for i in range(0, len(queries), REQUEST_QUERIES)]
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=model_name, unit="request")
    rankings: dict[str, list[str]] = {}
    started = time.perf_counter()
    with SearchClient(url, timeout_s=120, model_name=model_name) as client:
        client.wait_until_ready(timeout_s=60)
        for chunk in chunks:
            found = client.search_batch(list(chunk), k, rerank_depth=rerank_depth)
            for query, hits in zip(chunk, found, strict=True):
                rankings[query] = [RankedHit(hit.product_id, hit.score) for hit in hits]
    return rankings, time.perf_counter() - started


def markdown_table(metrics: dict[str, Metrics]) -> str:
    lines = [
        f"| stage | NDCG@{NDCG_CUTOFF} | Recall@{RECALL_CUTOFF} | MRR@{MRR_CUTOFF} | queries |",
        "|---|---|---|---|---|",
    ]
    for stage, m in metrics.items():
        lines.append(
            f"| {stage} | {m.ndcg_at_10:.4f} | {m.recall_at_100:.4f} | {m.mrr_at_10:.4f} "
            f"| {m.queries} |"
        )
    return "\n".join(lines) + "\n"


def load_judgments(
    judgments_path: Path | None, qrels: Path | None = None, topics: Path | None = None
) -> tuple[Judgments, dict[str, str]]:
    """Judgments and the qid of each query: from the CSV (qids are positions in the file), or
    from TREC qrels and topics (their own qids)."""
    from ecomsearch.evaluation.trec import read_qrels, read_topics

    if qrels is not None:
        if topics is None:
            raise ValueError("TREC qrels need a topics file (qid<TAB>query text) beside them")
        by_qid = read_topics(topics)
        judgments = read_qrels(qrels, by_qid)
        return judgments, {text: qid for qid, text in by_qid.items() if text in judgments.grades}
    if judgments_path is None:
        raise ValueError("give a judgments CSV, or TREC qrels and topics")
    judgments = read_judgments(judgments_path)
    return judgments, query_ids(list(judgments.grades))


def write_trec_files(
    out_dir: Path,
    rankings: dict[str, dict[str, list[RankedHit]]],
    scores: dict[str, dict[str, dict[str, float]]],
    judgments: Judgments,
    qids: dict[str, str],
) -> None:
    """run.<stage>.trec per stage, qrels.txt and topics.tsv of the queries sent (so trec_eval
    or ranx can score the runs without this project; gains scaled to whole numbers, see
    write_qrels), and per_query.tsv of `scores` (stage -> metric -> query -> score)."""
    sent = {query: qids[query] for query in next(iter(rankings.values()))}
    for stage, by_query in rankings.items():
        write_run(out_dir / f"run.{stage}.trec", by_query, qids, f"ecomsearch-{stage}")
    scale = write_qrels(out_dir / "qrels.txt", judgments, qids)
    write_topics(out_dir / "topics.tsv", sent)
    write_per_query(out_dir / "per_query.tsv", scores, qids)
    log.info(
        "qrels.txt gains are the judgments' gains times %d (whole numbers for trec_eval)", scale
    )


def comparison_table(comparisons: Sequence[PairedComparison], a: str, b: str) -> str:
    lines = [
        f"| metric | {a} | {b} | difference | randomisation p | paired t p | queries |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.metric} | {c.mean_a:.4f} | {c.mean_b:.4f} | {c.mean_difference:+.4f} "
            f"| {c.randomization_p:.4g} | {c.t_test_p:.4g} | {c.queries} |"
        )
    return "\n".join(lines) + "\n"


def run_eval(
    catalog: Path,
    judgments_path: Path | None,
    out_dir: Path,
    cache_dir: Path,
    url: str | None = None,
    split: str = "all",
    seed: int = DEFAULT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    limit: int | None = None,
    source_repository: Path | None = None,
    qrels: Path | None = None,
    topics: Path | None = None,
    rerank_depth: int | None = None,
) -> dict[str, Any]:
    """`source_repository` provides the models (default: the project's model_repository/).
    Judgments come from `judgments_path` (CSV) or `qrels` and `topics` (TREC). With
    `rerank_depth`, the ranked stage asks for the cross-encoder rerank (docs/relevance.md)."""
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.workspace import catalog_repository

    judgments, qids = load_judgments(judgments_path, qrels, topics)
    queries = select_queries(judgments, split, seed, validation_fraction)
    if limit is not None:
        queries = queries[:limit]
    judgments = judgments.restricted_to(queries)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%d distinct queries (%s split)", len(queries), split)

    server = None
    if url is None:
        repository, _ = catalog_repository(catalog, cache_dir, source_repository)
        server = TritonServer.local(repository, out_dir / "tritonserver.log").start()
        url = server.grpc_url
    try:
        rankings, seconds = {}, {}
        for stage, model_name in STAGES.items():
            rankings[stage], seconds[stage] = collect_rankings(
                url,
                model_name,
                queries,
                contract.MAX_TOP_K,
                rerank_depth=rerank_depth if stage == "ranked" else None,
            )
    finally:
        if server is not None:
            server.stop()

    ids = {
        stage: {q: [h.product_id for h in hits] for q, hits in r.items()}
        for stage, r in rankings.items()
    }
    metrics = {stage: evaluate(ids[stage], judgments) for stage in STAGES}
    scores = {stage: per_query_scores(ids[stage], judgments) for stage in STAGES}
    write_trec_files(out_dir, rankings, scores, judgments, qids)
    # Does the ranker's gain over retrieval hold query by query, or is it noise?
    comparisons = [
        compare_paired(scores["retrieval"][metric], scores["ranked"][metric], metric)
        for metric in METRICS
    ]
    report = {
        "catalog": str(catalog),
        "judgments": str(judgments_path if qrels is None else qrels),
        "split": split,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "queries_sent": len(queries),
        "rerank_depth": rerank_depth,
        "grade_scale": [judgments.lowest, judgments.highest],
        "metrics": {stage: m.as_dict() for stage, m in metrics.items()},
        "ranked_vs_retrieval": [c.as_dict() for c in comparisons],
        "seconds": seconds,
        "queries_per_second": {s: len(queries) / t for s, t in seconds.items() if t > 0},
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(metrics) + "\n" + comparison_table(comparisons, "retrieval", "ranked")
    (out_dir / "eval.md").write_text(
        f"# Relevance: {catalog.name} / {(judgments_path or qrels).name} ({split} split)\n\n{table}"
    )
    print(table)
    return report
