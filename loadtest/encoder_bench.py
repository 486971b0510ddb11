"""`ecomsearch bench-encoder`: two exported encoders (say fp32 and int8) on the same real
queries in one process: throughput at a few batch sizes, and how far their embeddings differ."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.encoder import OnnxEncoder
from ecomsearch.paths import ModelRepositoryLayout

BATCH_SIZES = (1, 16)
ROUNDS = 3  # alternate the encoders, so drift in machine load hits both alike


def queries_per_second(encoder: OnnxEncoder, queries: Sequence[str], batch: int) -> float:
    began = time.perf_counter()
    for start in range(0, len(queries), batch):
        encoder.encode(queries[start : start + batch], batch_size=batch)
    return len(queries) / (time.perf_counter() - began)


def compare_encoders(
    repositories: dict[str, Path], queries: Sequence[str], threads: int = 1
) -> dict:
    encoders = {
        name: OnnxEncoder(
            ModelRepositoryLayout(path).encoder_onnx,
            ModelRepositoryLayout(path).tokenizer_dir,
            max_length=contract.MAX_QUERY_TOKENS,
            intra_op_threads=threads,
        )
        for name, path in repositories.items()
    }
    speeds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCH_SIZES} for n in encoders}
    for encoder in encoders.values():
        encoder.encode(queries[:32])  # warm-up
    for _ in range(ROUNDS):
        for batch in BATCH_SIZES:
            for name, encoder in encoders.items():
                speeds[name][batch].append(queries_per_second(encoder, queries, batch))
    embeddings = {name: encoder.encode(queries) for name, encoder in encoders.items()}
    names = list(encoders)
    result = {
        "queries": len(queries),
        "intra_op_threads": threads,
        "queries_per_second": {
            name: {str(b): round(float(np.median(v)), 1) for b, v in by_batch.items()}
            for name, by_batch in speeds.items()
        },
    }
    if len(names) == 2:
        a, b = (embeddings[n] for n in names)
        cosine = np.sum(a * b, axis=1)
        result["speedup"] = {
            str(batch): round(
                float(np.median(speeds[names[1]][batch]) / np.median(speeds[names[0]][batch])), 2
            )
            for batch in BATCH_SIZES
        }
        result["embedding_cosine"] = {
            "mean": round(float(cosine.mean()), 5),
            "min": round(float(cosine.min()), 5),
        }
    return result


def write_comparison(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoders.json").write_text(json.dumps(result, indent=2) + "\n")
