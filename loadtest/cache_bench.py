"""`ecomsearch bench-cache`: Triton's response cache on a replay with a realistic repeat rate.

What the cache would pay if the stages whose output depends on the query text alone
(preprocess, query_encoder) cached their responses; the catalog-dependent ones never may. The
shipped configs do not enable it (tritonserver 2.51 caches an error response as an empty
success, see docs/performance.md), so the cached run serves a copy of the repository with
`response_cache { enable: true }` on those two models.

The replay is drawn from a judgments CSV, each query with probability proportional to its
number of judged rows: judged pairs were sampled from a shop's
search log, so a query judged more often stands for one searched more often. The stream's
repeat rate (1 - distinct / requests) is reported with the result; real logs, with their
head queries, repeat more than this, so the measured gain is a floor.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.loadtest.bench import rewritten_repository, triton_worker_factory
from ecomsearch.loadtest.load import closed_loop
from ecomsearch.loadtest.triton_stats import breakdown, snapshot

log = logging.getLogger(__name__)

CACHED_MODELS = (contract.PREPROCESS_MODEL, contract.ENCODER_MODEL)


def query_counts(judgments: Path) -> Counter[str]:
    """How many judged rows each query of a judgments CSV (query,product_id,...) has."""
    with open(judgments, newline="", encoding="utf-8") as stream:
        counts = Counter(row["query"] for row in csv.DictReader(stream))
    if not counts:
        raise ValueError(f"{judgments}: no queries")
    return counts


def replay_stream(counts: Counter[str], requests: int, seed: int = 0) -> list[str]:
    """`requests` queries drawn independently, each with probability proportional to its count."""
    if requests < 1:
        raise ValueError("requests must be at least 1")
    queries = sorted(counts)  # a fixed order, so a seed gives one stream
    weights = np.array([counts[q] for q in queries], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(queries), size=requests, p=weights / weights.sum())
    return [queries[i] for i in picks]


def repeat_rate(stream: Sequence[str]) -> float:
    """The share of requests whose query was already sent earlier in the stream: the hit
    rate an unbounded cache would reach."""
    return 1.0 - len(set(stream)) / len(stream) if stream else 0.0


@dataclass(frozen=True)
class CacheBenchSettings:
    requests: int = 4000
    concurrency: int = 16
    cache_mb: int = 64
    max_seconds: float = 60.0
    seed: int = 0


def run_cache_bench(
    repository: Path, judgments: Path, out_dir: Path, settings: CacheBenchSettings
) -> dict:
    """The same stream, closed loop, against a server without a response cache and one with."""
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.server.processes import group_cpu_seconds

    out_dir.mkdir(parents=True, exist_ok=True)
    stream = replay_stream(query_counts(judgments), settings.requests, settings.seed)
    report = {
        "judgments": str(judgments),
        "requests": len(stream),
        "distinct_queries": len(set(stream)),
        "repeat_rate": round(repeat_rate(stream), 4),
        "concurrency": settings.concurrency,
        "runs": [],
    }

    def enable_cache(model: str, config) -> None:
        if model in CACHED_MODELS:
            config.response_cache.enable = True

    cached = rewritten_repository(repository, out_dir / "repository-cached", enable_cache)
    for cache_mb, served in ((0, repository), (settings.cache_mb, cached)):
        with TritonServer.local(
            served,
            out_dir / f"tritonserver-cache-{cache_mb}mb.log",
            response_cache_bytes=cache_mb * 1024 * 1024,
        ) as server:
            clients: list = []
            factory = triton_worker_factory(
                server.grpc_url, contract.SEARCH_MODEL, contract.DEFAULT_TOP_K, clients
            )
            try:
                before = snapshot(server.grpc_url, server.admin_headers)
                cpu_before = group_cpu_seconds(server.process.pid)
                result = closed_loop(
                    f"cache {cache_mb} MiB",
                    factory,
                    stream,
                    settings.concurrency,
                    len(stream),
                    settings.max_seconds,
                    warmup_requests=0,
                    in_order=True,
                )
                cpu_s = group_cpu_seconds(server.process.pid) - cpu_before
                stages = breakdown(before, snapshot(server.grpc_url, server.admin_headers))
            finally:
                for client in clients:
                    client.close()
        run = {
            "cache_mb": cache_mb,
            **result.summary(),
            "server_cpu_ms_per_request": round(1000 * cpu_s / max(result.requests, 1), 3),
            "cache_hit_rate": {m: stages.get(m, {}).get("cache_hit_rate") for m in CACHED_MODELS},
        }
        report["runs"].append(run)
        log.info(
            "cache %d MiB: %.1f req/s, p50 %.2f ms, p99 %.2f ms, %.2f ms CPU a request, hits %s",
            cache_mb,
            result.throughput_rps,
            result.percentile_ms(50),
            result.percentile_ms(99),
            run["server_cpu_ms_per_request"],
            run["cache_hit_rate"],
        )
    (out_dir / "cache.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "cache.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        "# Response cache on a replayed stream",
        "",
        f"{report['requests']} requests, {report['distinct_queries']} distinct queries "
        f"(repeat rate {report['repeat_rate']:.1%}), drawn from `{report['judgments']}` in "
        f"proportion to each query's judged rows; closed loop, {report['concurrency']} clients.",
        "",
        "| cache | req/s | p50 ms | p99 ms | server CPU per request ms | preprocess hits "
        "| query_encoder hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        hits = run["cache_hit_rate"]

        def shown(rate: float | None) -> str:
            return "" if rate is None else f"{rate:.1%}"

        lines.append(
            f"| {run['cache_mb']} MiB | {run['throughput_rps']:.1f} | {run['p50_ms']:.2f} "
            f"| {run['p99_ms']:.2f} | {run['server_cpu_ms_per_request']:.2f} "
            f"| {shown(hits[contract.PREPROCESS_MODEL])} | {shown(hits[contract.ENCODER_MODEL])} |"
        )
    off, on = report["runs"][0], report["runs"][-1]
    if off["throughput_rps"]:
        lines += [
            "",
            f"Throughput with / without: {on['throughput_rps'] / off['throughput_rps']:.2f}",
        ]
    return "\n".join(lines) + "\n"
