"""`ecomsearch eval-recs` end to end on the tiny Online Retail fixture (tests/data/online_retail):
training, a fresh store holding the history, its own server, the frozen and the real-time
replay, similar and the latency figures. The full run on the shared data is a command of its
own (docs/recommendations.md); this is its smoke version."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ecomsearch.export.ranker import export_recommend_ranker
from ecomsearch.recommend.evaluation import run_eval_recs
from ecomsearch.recommend.transactions import (
    evaluation_baskets,
    parse_time_s,
    read_purchases,
)
from tests.project import MODEL_REPOSITORY, PROJECT_ROOT

FIXTURE = PROJECT_ROOT / "tests" / "data" / "online_retail"
TRANSACTIONS = FIXTURE / "transactions_sample.csv"
CATALOG = FIXTURE / "catalog_sample.jsonl"
CUTOFF = "2011-10-25"


@pytest.fixture(scope="module")
def report(tmp_path_factory, embedding_cache) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval-recs")
    result = run_eval_recs(
        TRANSACTIONS,
        CATALOG,
        parse_time_s(CUTOFF),
        out,
        cache_dir=embedding_cache,
        source_repository=MODEL_REPOSITORY,
        export=export_recommend_ranker,
        similar_anchors=60,
        search_probes=30,
    )
    return result, out


def test_every_test_basket_is_scored_in_both_modes_by_every_recommender(report) -> None:
    result, _ = report
    purchases = read_purchases(TRANSACTIONS)
    baskets = evaluation_baskets(purchases, parse_time_s(CUTOFF))
    assert result["counts"]["test_baskets"] == len(baskets) > 20
    for mode in ("frozen", "realtime"):
        for name, metrics in result[mode]["metrics"].items():
            assert metrics["baskets"] == len(baskets), (mode, name)
            for metric in ("recall_at_20", "ndcg_at_20", "hit_rate_at_20"):
                assert 0.0 <= metrics[metric] <= 1.0
        assert result[mode]["latency"]["recommend"]["count"] == len(baskets)
    # Real-time sends every test purchase of a catalog product through `events`, and only then.
    assert result["frozen"]["events_sent"] == 0
    assert result["realtime"]["events_sent"] == sum(len(b.products) for b in baskets)
    assert result["realtime"]["latency"]["record_events"]["count"] == len(baskets)


def test_the_served_recommender_learns_from_the_history_and_the_replayed_events(report) -> None:
    """On these 40 heavy buyers, knowing their purchases beats not knowing them, and the events
    of the test period reach the served recommendations."""
    result, _ = report
    ndcg = "ndcg_at_20"
    for mode in ("frozen", "realtime"):
        metrics = result[mode]["metrics"]
        assert metrics["recommend"][ndcg] > 2 * metrics["popular"][ndcg], mode
    # The replayed baskets reach the served recommendations (ignored, they would change nothing).
    frozen, realtime = result["frozen"]["metrics"], result["realtime"]["metrics"]
    assert realtime["recommend"][ndcg] > frozen["recommend"][ndcg]


def test_personalised_search_is_measured_on_every_basket(report) -> None:
    result, _ = report
    baskets = evaluation_baskets(read_purchases(TRANSACTIONS), parse_time_s(CUTOFF))
    personal = result["realtime"]["personalised_search"]
    assert personal["queries"] == len(baskets)  # every product of the fixture is in its catalog
    assert 0 < personal["bought_before"] <= len(baskets)
    for value in personal["mrr_at_10"].values():
        assert 0.0 < value <= 1.0
    assert "personalised_search" not in result["frozen"]


def test_similar_and_the_reports(report) -> None:
    result, out = report
    similar = result["similar"]
    assert similar["anchors"] == 60
    assert set(similar["metrics"]) == {"similar", "embedding_neighbours"}
    saved = json.loads((out / "recs.json").read_text())
    assert saved["summary"] == result["summary"]
    markdown = (out / "recs.md").read_text()
    assert "| realtime | recommend |" in markdown and "record_events" in markdown
    # What it started is stopped, what it made in between is gone.
    assert not (out / "work").exists()
    running = subprocess.run(
        ["pgrep", "-f", str(out / "work")], capture_output=True, text=True, check=False
    )
    assert running.stdout == ""
