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
    url: str, model_name: str, queries: Sequence[str], k: int, progress: bool = True
) -> tuple[dict[str, list[str]], float]:
    """query -> served product ids (best first), and the seconds it took."""
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
            for query, hits in zip(chunk, client.search_batch(list(chunk), k), strict=True):
                rankings[query] = [hit.product_id for hit in hits]
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


def run_eval(
    catalog: Path,
    judgments_path: Path,
    out_dir: Path,
    cache_dir: Path,
    url: str | None = None,
    split: str = "all",
    seed: int = DEFAULT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    limit: int | None = None,
    source_repository: Path | None = None,
) -> dict[str, Any]:
    """`source_repository` provides the models (default: the project's model_repository/)."""
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.workspace import catalog_repository

    judgments = read_judgments(judgments_path)
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
                url, model_name, queries, contract.MAX_TOP_K
            )
    finally:
        if server is not None:
            server.stop()

    metrics = {stage: evaluate(rankings[stage], judgments) for stage in STAGES}
    report = {
        "catalog": str(catalog),
        "judgments": str(judgments_path),
        "split": split,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "queries_sent": len(queries),
        "grade_scale": [judgments.lowest, judgments.highest],
        "metrics": {stage: m.as_dict() for stage, m in metrics.items()},
        "seconds": seconds,
        "queries_per_second": {s: len(queries) / t for s, t in seconds.items() if t > 0},
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(metrics)
    (out_dir / "eval.md").write_text(
        f"# Relevance: {catalog.name} / {judgments_path.name} ({split} split)\n\n{table}"
    )
    print(table)
    return report
