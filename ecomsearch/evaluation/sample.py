"""A fixed judged sample small enough to evaluate in every test run: the relevance gate.

Validation queries (never trained on) with their judged products, plus distractors from the
rest of the catalog, chosen by a hash of their text and ids rather than by a random draw, so
the sample is the same on every machine and under any Python. The products written are the
catalog's own records; the sample lives where the caller says (a cache or tmp directory) and
is rebuilt from the data, never committed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ecomsearch.catalog import iter_records
from ecomsearch.evaluation.metrics import read_judgments
from ecomsearch.evaluation.splits import DEFAULT_SEED, DEFAULT_VALIDATION_FRACTION, split_queries

SAMPLE_QUERIES = 300
SAMPLE_DISTRACTORS = 3000


def _rank(seed: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


@dataclass(frozen=True)
class JudgedSample:
    catalog: Path
    judgments: Path
    queries: int
    judged_products: int
    distractors: int


def write_judged_sample(
    catalog: Path,
    judgments_path: Path,
    out_dir: Path,
    queries: int = SAMPLE_QUERIES,
    distractors: int = SAMPLE_DISTRACTORS,
    seed: int = DEFAULT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> JudgedSample:
    """Writes out_dir/catalog.jsonl and out_dir/judgments.csv: `queries` validation queries
    (by the same split as train-ranker and train-encoder), every judgment of theirs whose product
    is in the catalog, and `distractors` other products."""
    judgments = read_judgments(judgments_path)
    _, validation = split_queries(judgments.evaluable_queries(), seed, validation_fraction)
    chosen = sorted(validation, key=lambda q: _rank(f"gate-{seed}", q))[:queries]
    if len(chosen) < queries:
        raise ValueError(f"only {len(chosen)} validation queries; {queries} asked for")
    judged = {pid for query in chosen for pid in judgments.grades[query]}
    records = {}
    for _, record in iter_records(catalog):
        product_id = record.get("id") if isinstance(record, dict) else None
        if isinstance(product_id, str):
            records[product_id] = record
    others = sorted(
        (pid for pid in records if pid not in judged),
        key=lambda pid: _rank(f"distractor-{seed}", pid),
    )[:distractors]
    keep = judged | set(others)
    kept = [pid for pid in records if pid in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_catalog, sample_judgments = out_dir / "catalog.jsonl", out_dir / "judgments.csv"
    with sample_catalog.open("w", encoding="utf-8") as out:
        for pid in kept:
            out.write(json.dumps(records[pid], ensure_ascii=False) + "\n")
    with sample_judgments.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["query", "product_id", "relevance"])
        for query in chosen:
            for pid, grade in judgments.grades[query].items():
                if pid in records:
                    writer.writerow([query, pid, f"{grade:g}"])
    return JudgedSample(
        sample_catalog,
        sample_judgments,
        len(chosen),
        sum(pid in records for pid in judged),
        len(others),
    )
