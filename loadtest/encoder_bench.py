"""`ecomsearch bench-encoder`: every exported encoder file of one or more model repositories
(float32 and its int8 twin) on the same real queries in one process: queries per second at a few
batch sizes, how far each embedding is from the reference (the first repository's float32), and
whether a query's embedding depends on the queries batched with it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.encoder import OnnxEncoder, row_cosines
from ecomsearch.paths import ModelRepositoryLayout

BATCH_SIZES = (1, 4, 16)
ROUNDS = 5  # alternate the encoders, so drift in machine load hits all alike; keep the best
ROW_CHECK_BATCH = 16  # queries embedded alone and in batches of this size, for row independence


def encoder_files(repositories: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """`name:float32` and `name:int8` -> (ONNX file, tokenizer directory), for each repository
    that has them; the first entry is the reference."""
    files = {}
    for name, repository in repositories.items():
        layout = ModelRepositoryLayout(repository)
        for kind, path in (("float32", layout.encoder_onnx), ("int8", layout.encoder_int8_onnx)):
            if path.is_file():
                files[f"{name}:{kind}"] = (path, layout.tokenizer_dir)
    if not files:
        raise FileNotFoundError("no exported encoder in the repositories; run export-encoder")
    return files


def seconds_per_query(encoder: OnnxEncoder, batches: Sequence[tuple[np.ndarray, np.ndarray]]):
    began = time.perf_counter()
    for input_ids, attention_mask in batches:
        encoder.encode_ids(input_ids, attention_mask)
    return (time.perf_counter() - began) / sum(len(ids) for ids, _ in batches)


def compare_encoders(
    repositories: dict[str, Path], queries: Sequence[str], threads: int = 1
) -> dict:
    encoders = {
        name: OnnxEncoder(
            path, tokenizer_dir, max_length=contract.MAX_QUERY_TOKENS, intra_op_threads=threads
        )
        for name, (path, tokenizer_dir) in encoder_files(repositories).items()
    }
    reference_name = next(iter(encoders))
    tokenizer = encoders[reference_name].tokenizer
    # Batches as Triton forms them: consecutive queries, padded to the longest of the batch.
    batches = {
        size: [tokenizer(queries[start : start + size]) for start in range(0, len(queries), size)]
        for size in BATCH_SIZES
    }
    best = {name: {size: float("inf") for size in BATCH_SIZES} for name in encoders}
    for encoder in encoders.values():
        encoder.encode_ids(*batches[BATCH_SIZES[-1]][0])  # warm-up
    for _ in range(ROUNDS):
        for size in BATCH_SIZES:
            for name, encoder in encoders.items():
                elapsed = seconds_per_query(encoder, batches[size])
                best[name][size] = min(best[name][size], elapsed)

    alone = {
        name: np.concatenate([encoder.encode_ids(*tokenizer([query])) for query in queries])
        for name, encoder in encoders.items()
    }
    batched = {
        name: np.concatenate([encoder.encode_ids(*batch) for batch in batches[ROW_CHECK_BATCH]])
        for name, encoder in encoders.items()
    }
    reference = alone[reference_name]
    result: dict = {
        "queries": len(queries),
        "intra_op_threads": threads,
        "reference": reference_name,
        "ms_per_query": {
            name: {str(size): round(seconds * 1e3, 3) for size, seconds in by_size.items()}
            for name, by_size in best.items()
        },
        "speedup_over_reference": {
            name: {
                str(size): round(best[reference_name][size] / best[name][size], 2)
                for size in BATCH_SIZES
            }
            for name in encoders
        },
        "cosine_to_reference": {},
        "cosine_alone_to_batched_min": {},
    }
    for name in encoders:
        cosine = row_cosines(alone[name], reference)
        result["cosine_to_reference"][name] = {
            "mean": round(float(cosine.mean()), 5),
            "min": round(float(cosine.min()), 5),
        }
        rows = row_cosines(alone[name], batched[name])
        result["cosine_alone_to_batched_min"][name] = round(float(rows.min()), 6)
    return result


def markdown(result: dict) -> str:
    sizes = list(next(iter(result["ms_per_query"].values())))
    lines = [
        f"{result['queries']} queries, {result['intra_op_threads']} intra-op thread(s), best of "
        f"{ROUNDS} rounds; cosines against {result['reference']} alone",
        "",
        "| encoder | "
        + " | ".join(f"ms a query, batch {size}" for size in sizes)
        + " | cosine to reference, min / mean | alone vs batched of "
        + f"{ROW_CHECK_BATCH}, min cosine |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    for name, by_size in result["ms_per_query"].items():
        cosine = result["cosine_to_reference"][name]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{by_size[size]:.2f}" for size in sizes)
            + f" | {cosine['min']:.4f} / {cosine['mean']:.4f}"
            + f" | {result['cosine_alone_to_batched_min'][name]:.6f} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoders.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "encoders.md").write_text(markdown(result))
