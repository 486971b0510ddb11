"""`ecomsearch bench-scaling`: the vector search of the retrieve step alone, as the catalog grows.

Synthetic vectors (say so in any report): unit vectors drawn around random cluster centres,
which, unlike uniform noise, have the neighbourhood structure of real embeddings. The index type
is chosen exactly as `build-index` chooses it, so the table shows where it switches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch.index.builder import (
    EXACT_SEARCH_MAX_PRODUCTS,
    RECALL_K,
    choose_index_type,
    make_faiss_index,
)
from ecomsearch.ranking.candidates import VECTOR_POOL

log = logging.getLogger(__name__)

DIMENSION = 384
CLUSTERS = 2000
SPREAD = 0.6  # per-dimension noise around a centre, relative to the centre's own scale
CHUNK = 100_000


def clustered_unit_vectors(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, centres.shape[1]), dtype=np.float32)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        chunk = centres[rng.integers(len(centres), size=n)]
        chunk = chunk + rng.normal(0, SPREAD, chunk.shape).astype(np.float32)
        vectors[start : start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def measure_size(
    count: int,
    queries: int,
    search_k: int,
    seed: int = 0,
    exact_max_products: int = EXACT_SEARCH_MAX_PRODUCTS,
) -> dict[str, float | int | str]:
    import faiss

    if search_k < RECALL_K:
        raise ValueError(f"search_k must be at least {RECALL_K} to measure recall@{RECALL_K}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLUSTERS, DIMENSION)).astype(np.float32)
    vectors = clustered_unit_vectors(count, seed + 1, centres)
    probes = clustered_unit_vectors(queries, seed + 2, centres)

    index_type = choose_index_type(count, exact_max_products)
    began = time.perf_counter()
    index, params = make_faiss_index(vectors, index_type)
    build_s = time.perf_counter() - began

    exact = faiss.IndexFlatIP(DIMENSION)
    exact.add(vectors)
    _, truth = exact.search(probes, RECALL_K)

    # As served: one query at a time, one FAISS thread, the retrieve step's pool size.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        latencies, found = [], []
        for probe in probes:
            began = time.perf_counter()
            _, rows = index.search(probe[None, :], search_k)
            latencies.append((time.perf_counter() - began) * 1000)
            found.append(rows[0, :RECALL_K])
    finally:
        faiss.omp_set_num_threads(threads)
    recall = np.mean([len(set(t) & set(f)) / RECALL_K for t, f in zip(truth, found, strict=True)])
    result = {
        "products": count,
        "index_type": index_type,
        "index_params": json.dumps(params),
        "build_s": round(build_s, 2),
        "search_k": search_k,
        "queries": queries,
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "recall_at_100": round(float(recall), 4),
    }
    log.info("%s", result)
    return result


def run_scaling(
    sizes: Sequence[int],
    out_dir: Path,
    queries: int = 200,
    search_k: int = VECTOR_POOL,
    exact_max_products: int = EXACT_SEARCH_MAX_PRODUCTS,
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [
        measure_size(size, queries, search_k, exact_max_products=exact_max_products)
        for size in sizes
    ]
    (out_dir / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Retrieval scaling (synthetic clustered unit vectors, 384-d)",
        "",
        "| products | index | build s | p50 ms | p99 ms | recall@100 vs exact |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['products']:,} | {r['index_type']} {r['index_params']} | {r['build_s']} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['recall_at_100']} |"
            for r in results
        ),
    ]
    if len(results) > 1:
        first, last = results[0], results[-1]
        lines += [
            "",
            f"p99 at {last['products']:,} / p99 at {first['products']:,}: "
            f"{last['p99_ms'] / first['p99_ms']:.2f}x (target <= 10x)",
        ]
    (out_dir / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results
