"""The benchmark harness and the Locust load test run end to end with tiny counts (no timing
assertions: performance figures come from `ecomsearch bench`, not from tests)."""

from __future__ import annotations

import csv
import json

import pytest

from ecomsearch.loadtest.bench import SYSTEMS, BenchSettings, run_bench
from ecomsearch.loadtest.load import closed_loop
from ecomsearch.loadtest.runner import run_loadtest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUERIES = ["wireless gaming mouse", "1tb nvme ssd", "ddr5 32gb memory kit"]


def test_closed_loop_counts_requests_and_errors():
    def factory():
        def call(query):
            if query == "fails":
                raise RuntimeError("boom")

        return call

    result = closed_loop(
        "fake", factory, ["ok", "fails"], 2, max_requests=10, max_seconds=5, warmup_requests=0
    )
    assert result.requests + result.errors == 10
    assert result.errors > 0 and result.requests > 0
    assert result.summary()["p50_ms"] >= 0


def test_bench_runs_every_system_and_writes_reports(model_repository, tmp_path):
    settings = BenchSettings(
        concurrencies=(1, 2), max_requests=6, max_seconds=10, no_batching_concurrencies=(2,)
    )
    report = run_bench(model_repository, QUERIES, tmp_path, settings)
    cells = {(r["system"], r["concurrency"]) for r in report.runs}
    assert cells == {
        ("triton", 1), ("triton", 2), ("triton_no_batching", 2),
        ("in_process", 1), ("in_process", 2), ("naive", 1), ("naive", 2),
    }  # fmt: skip
    assert {r["system"] for r in report.runs} == set(SYSTEMS)
    assert all(r["errors"] == 0 and r["requests"] == 6 for r in report.runs), report.runs
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["runs"] == report.runs
    assert "search" in saved["stages"]["triton@2"]
    assert "ranker" in saved["stages"]["triton@2"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| triton | 2 | 6 | 0 |" in markdown
    for plot in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


def test_locust_headless_run_exits_by_itself_with_reports(grpc_url, tmp_path):
    code = run_loadtest(
        grpc_url, users=2, spawn_rate=2, duration="4s", out_dir=tmp_path, timeout_s=90
    )
    assert code == 0
    with open(tmp_path / "locust_stats.csv", newline="") as stream:
        rows = {row["Name"]: row for row in csv.DictReader(stream)}
    assert int(rows["search"]["Request Count"]) > 0
    assert int(rows["search"]["Failure Count"]) == 0
    precise = json.loads((tmp_path / "precise_latency.json").read_text())
    assert precise["requests"] > 0 and precise["p50_ms"] > 0
    assert (tmp_path / "locust.html").stat().st_size > 0


def test_scaling_reports_each_size_and_the_index_switch(tmp_path):
    from ecomsearch.loadtest.scaling import run_scaling

    results = run_scaling([300, 3000], tmp_path, queries=20, search_k=100, exact_max_products=1000)
    assert [r["index_type"] for r in results] == ["flat", "hnsw"]
    assert results[0]["recall_at_100"] == 1.0  # exact search is exact
    assert 0.5 < results[1]["recall_at_100"] <= 1.0
    assert "| 3,000 | hnsw" in (tmp_path / "scaling.md").read_text()
    assert len(json.loads((tmp_path / "scaling.json").read_text())) == 2
