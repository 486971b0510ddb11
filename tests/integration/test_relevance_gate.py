"""The relevance gate: the served `search` on a fixed judged sample of the Home Depot
validation queries (ecomsearch.evaluation.sample) must not lose more than GATE_TOLERANCE of
NDCG@10 against the figure recorded with the shipped models (relevance_gate.json). The same
run's TREC files are scored again by ranx, so the reported metrics can be checked by anyone.

The data lives outside the project (../shared, or $ECOMSEARCH_RELEVANCE_DATA); CI has it. After
a deliberate change of the models, record the new figure: `make relevance-gate RECORD=1`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ecomsearch.evaluation.gate import GATE_TOLERANCE, run_gate
from ecomsearch.evaluation.metrics import read_judgments
from ecomsearch.evaluation.sample import SAMPLE_DISTRACTORS, SAMPLE_QUERIES
from ecomsearch.paths import default_cache_dir
from tests.project import PROJECT_ROOT

from .conftest import SOURCE_REPOSITORY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA_DIR = Path(
    os.environ.get(
        "ECOMSEARCH_RELEVANCE_DATA", PROJECT_ROOT.parent / "shared" / "data" / "home_depot"
    )
)
RECORD = Path(__file__).with_name("relevance_gate.json")


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    # The sample's index is cached like any catalog's: minutes once, seconds after.
    return run_gate(
        DATA_DIR, RECORD, tmp_path_factory.mktemp("gate"), default_cache_dir(), SOURCE_REPOSITORY
    )


def test_ndcg_at_10_has_not_dropped_from_the_recorded_figure(gate):
    recorded = gate.recorded
    assert recorded is not None, f"{RECORD} is missing: `make relevance-gate RECORD=1`"
    assert recorded["sample"] == {"queries": SAMPLE_QUERIES, "distractors": SAMPLE_DISTRACTORS}
    ranked = gate.report["metrics"]["ranked"]
    print(
        f"relevance gate: NDCG@10 {ranked['ndcg_at_10']:.4f} (recorded "
        f"{recorded['ranked']['ndcg_at_10']:.4f}), Recall@100 {ranked['recall_at_100']:.4f}, "
        f"retrieval alone {gate.report['metrics']['retrieval']['ndcg_at_10']:.4f}"
    )
    assert ranked["queries"] == SAMPLE_QUERIES
    assert gate.passed, (
        f"NDCG@10 {gate.ndcg_at_10:.4f} fell more than {GATE_TOLERANCE} below the recorded "
        f"{recorded['ranked']['ndcg_at_10']:.4f}; if the change is deliberate, record it: "
        "`make relevance-gate RECORD=1`"
    )


def test_the_served_run_scores_the_same_in_ranx(gate):
    """qrels.txt and run.*.trec as written by `eval`, read by ranx: the same means (to the
    judgments' two-decimal grades, which qrels.txt holds as exact thirds)."""
    ranx = pytest.importorskip("ranx")
    out = gate.out_dir
    qrels = ranx.Qrels.from_file(str(out / "qrels.txt"), kind="trec")
    judgments = read_judgments(gate.report["judgments"])
    # qrels gains are scaled to whole numbers: relevant from half the scale, scaled alike.
    scale = max(max(v.values()) for v in qrels.to_dict().values()) / (
        judgments.highest - judgments.lowest
    )
    level = round(judgments.relevant_gain * scale)
    for stage in ("retrieval", "ranked"):
        run = ranx.Run.from_file(str(out / f"run.{stage}.trec"), kind="trec")
        theirs = ranx.evaluate(
            qrels,
            run,
            ["ndcg@10", f"recall@100-l{level}", f"mrr@10-l{level}"],
            make_comparable=True,
        )
        ours = gate.report["metrics"][stage]
        assert theirs["ndcg@10"] == pytest.approx(ours["ndcg_at_10"], abs=2e-3), stage
        assert theirs[f"recall@100-l{level}"] == pytest.approx(ours["recall_at_100"], abs=1e-6)
        assert theirs[f"mrr@10-l{level}"] == pytest.approx(ours["mrr_at_10"], abs=1e-6)


def test_eval_reports_per_query_scores_and_the_rankers_paired_test(gate):
    out = gate.out_dir
    rows = (out / "per_query.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["stage", "metric", "qid", "query", "score"]
    assert len(rows) - 1 == 2 * 3 * SAMPLE_QUERIES
    comparisons = {c["metric"]: c for c in gate.report["ranked_vs_retrieval"]}
    assert set(comparisons) == {"ndcg@10", "recall@100", "mrr@10"}
    for c in comparisons.values():
        assert 0 < c["randomization_p"] <= 1 and 0 <= c["t_test_p"] <= 1
        assert c["mean_difference"] == pytest.approx(c["mean_b"] - c["mean_a"], abs=1e-9)
    eval_json = json.loads((out / "eval.json").read_text())
    assert eval_json["ranked_vs_retrieval"] == gate.report["ranked_vs_retrieval"]
