"""The relevance gate: the served pipeline's NDCG@10 on a fixed judged sample
(ecomsearch.evaluation.sample) against the figure recorded when the models last changed.

`make test` runs it (tests/integration/test_relevance_gate.py) and fails on a drop of more than
GATE_TOLERANCE; `make relevance-gate RECORD=1` measures and records a new figure after a
deliberate change (a retrained encoder or ranker), with the models it was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecomsearch.evaluation.sample import SAMPLE_DISTRACTORS, SAMPLE_QUERIES, write_judged_sample

GATE_TOLERANCE = 0.01
# The layout of the Home Depot data in ../shared/data/home_depot (and of any stand-in).
CATALOG_FILE, JUDGMENTS_FILE = "catalog.jsonl", "judgments_dev.csv"


@dataclass(frozen=True)
class GateResult:
    report: dict[str, Any]  # ecomsearch eval's report on the sample
    out_dir: Path  # eval.json, the TREC runs, qrels and per-query scores
    recorded: dict[str, Any] | None

    @property
    def ndcg_at_10(self) -> float:
        return self.report["metrics"]["ranked"]["ndcg_at_10"]

    @property
    def floor(self) -> float | None:
        if self.recorded is None:
            return None
        return self.recorded["ranked"]["ndcg_at_10"] - GATE_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.floor is not None and self.ndcg_at_10 >= self.floor


def run_gate(
    data_dir: Path,
    record_path: Path,
    out_dir: Path,
    cache_dir: Path,
    source_repository: Path | None = None,
    record: bool = False,
) -> GateResult:
    """Builds the sample from data_dir (CATALOG_FILE, JUDGMENTS_FILE), evaluates it through a
    server of its own, and compares with record_path (or writes it, with `record`)."""
    from ecomsearch.evaluation.harness import run_eval
    from ecomsearch.fingerprint import file_sha256
    from ecomsearch.paths import ModelRepositoryLayout, default_model_repository

    for name in (CATALOG_FILE, JUDGMENTS_FILE):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(
                f"the relevance gate needs {data_dir / name} (the Home Depot judgments in "
                "../shared/data/home_depot, or $ECOMSEARCH_RELEVANCE_DATA)"
            )
    sample = write_judged_sample(
        data_dir / CATALOG_FILE, data_dir / JUDGMENTS_FILE, out_dir / "sample"
    )
    report = run_eval(
        sample.catalog,
        sample.judgments,
        out_dir / "eval",
        cache_dir=cache_dir,
        split="all",
        source_repository=source_repository,
    )
    if record:
        layout = ModelRepositoryLayout(source_repository or default_model_repository())
        figures = {
            "sample": {"queries": SAMPLE_QUERIES, "distractors": SAMPLE_DISTRACTORS},
            **{stage: report["metrics"][stage] for stage in ("retrieval", "ranked")},
            "models": {
                "encoder_sha256": file_sha256(layout.encoder_onnx),
                "ranker_sha256": file_sha256(layout.ranker_onnx),
            },
        }
        record_path.write_text(json.dumps(figures, indent=2) + "\n")
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    return GateResult(report, out_dir / "eval", recorded)
