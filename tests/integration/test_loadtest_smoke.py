"""The benchmark harness and the Locust load test run end to end with tiny counts (no timing
assertions: performance figures come from `ecomsearch bench`, not from tests)."""

from __future__ import annotations

import csv
import json

import pytest

from ecomsearch.loadtest.bench import SYSTEMS, BenchSettings, load_queries, run_bench
from ecomsearch.loadtest.freshness import FreshnessSettings, run_freshness
from ecomsearch.loadtest.load import closed_loop
from ecomsearch.loadtest.runner import run_loadtest
from ecomsearch.paths import default_queries

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
    # What a query costs: the stages' compute, the server's and the load generator's CPU.
    triton = next(r for r in report.runs if (r["system"], r["concurrency"]) == ("triton", 2))
    assert triton["stage_compute_per_row_ms"] > 0 and triton["server_cpu_ms_per_request"] > 0
    assert triton["client_cpu_ms_per_request"] > 0
    assert {"tritonserver", "query_encoder", "retrieve"} <= set(triton["server_cpu_ms_by_process"])
    assert "CPU per query at c=16" in markdown
    # The in-process pipeline's own compute, stage by stage, at the batch sizes the queries fill.
    assert list(report.compute_floor) == [1]
    assert set(report.compute_floor[1]) == {
        "preprocess", "query_encoder", "retrieve", "ranker", "select",
    }  # fmt: skip
    assert report.compute_floor[1]["query_encoder"] > 0 and report.compute_floor[1]["retrieve"] > 0
    assert saved["compute_floor"] == {"1": report.compute_floor[1]}
    assert "The pipeline's own compute" in markdown
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


def test_locust_shopper_scenario_searches_recommends_and_records_views(grpc_url, tmp_path):
    code = run_loadtest(
        grpc_url,
        users=2,
        spawn_rate=2,
        duration="5s",
        out_dir=tmp_path,
        timeout_s=90,
        scenario="shopper",
    )
    assert code == 0
    with open(tmp_path / "locust_stats.csv", newline="") as stream:
        rows = {row["Name"]: row for row in csv.DictReader(stream)}
    for name in ("search", "recommend", "events"):
        assert int(rows[name]["Request Count"]) > 0, name
        assert int(rows[name]["Failure Count"]) == 0, name
    precise = json.loads((tmp_path / "precise_latency.json").read_text())
    assert set(precise["by_call"]) == {"search", "recommend", "events"}
    assert precise["p50_ms"] == precise["by_call"]["search"]["p50_ms"]


def test_scaling_reports_each_size_and_the_index_switch(tmp_path):
    from ecomsearch.loadtest.scaling import run_scaling

    results = run_scaling([300, 3000], tmp_path, queries=20, search_k=100, exact_max_products=1000)
    assert [r["index_type"] for r in results] == ["flat", "hnsw"]
    assert results[0]["recall_at_100"] == 1.0  # exact search is exact
    assert 0.5 < results[1]["recall_at_100"] <= 1.0
    assert "| 3,000 | hnsw" in (tmp_path / "scaling.md").read_text()
    assert len(json.loads((tmp_path / "scaling.json").read_text())) == 2


def test_freshness_measures_every_phase_and_every_new_product_becomes_visible(
    fixture_catalog, embedding_cache, model_repository, tmp_path
):
    settings = FreshnessSettings(
        searchers=2,
        phase_seconds=3,
        write_batch=5,
        selectivities=(0.001, 0.1),
        filtered_queries=10,
    )
    queries = load_queries(default_queries(), 50)
    report = run_freshness(
        fixture_catalog, model_repository, embedding_cache, queries, tmp_path / "out", settings
    )
    assert report["catalog"]["products"] == 861
    for phase in ("search_alone", "search_with_writer"):
        assert report[phase]["requests"] > 0 and report[phase]["errors"] == 0, report[phase]
    assert report["with_writer_vs_alone"]["throughput"] > 0

    writes = report["writes"]
    assert writes["writes"] > 0 and writes["errors"] == 0, writes
    assert writes["products"] == 5 * writes["writes"] == sum(writes["by_kind"].values())
    assert writes["by_kind"]["new"] > 0 and writes["latency_p50_ms"] > 0
    visibility = report["visibility"]
    assert visibility["new_products"] == writes["by_kind"]["new"]
    assert visibility["visible"] == visibility["new_products"], visibility
    assert visibility["not_visible"] == 0 and visibility["probe_errors"] == 0
    assert 0 < visibility["lag_to_send_p50_ms"] < visibility["lag_p50_ms"]
    assert visibility["lag_p50_ms"] <= visibility["lag_max_ms"] < 10_000

    filtered = report["filtered"]
    # The catalog, the warm-up product and the new products, all live.
    assert filtered["live_products"] == 861 + 1 + writes["by_kind"]["new"]
    assert filtered["unfiltered"]["requests"] == 10 and filtered["unfiltered"]["errors"] == 0
    rows = filtered["rows"]
    prices = [row for row in rows if row["kind"] == "price"]
    assert [row["target_selectivity"] for row in prices] == [0.001, 0.1]
    assert prices[0]["matching"] >= 1 and prices[1]["matching"] > 10
    assert {row["kind"] for row in rows} == {"price", "brand", "category"}
    for row in rows:
        assert row["load"]["requests"] == 10 and row["load"]["errors"] == 0, row
        assert row["selectivity"] == row["matching"] / filtered["live_products"]
        # Exact filters: k results whenever k products pass, all of them otherwise.
        expected = min(10, row["matching"])
        assert row["results"]["min"] == row["results"]["max"] == expected, row

    out = tmp_path / "out"
    assert json.loads((out / "freshness.json").read_text()) == report
    markdown = (out / "freshness.md").read_text()
    assert "## Visibility lag of new products" in markdown and "| with writer / alone |" in markdown
    assert (out / "tritonserver.log").stat().st_size > 0


def test_bench_cache_replays_a_stream_with_and_without_the_cache(model_repository, tmp_path):
    from ecomsearch.loadtest.cache_bench import CacheBenchSettings, run_cache_bench

    judgments = tmp_path / "judgments.csv"
    rows = [f"{q},p{i},3" for q in ("gaming mouse", "nvme ssd", "case fan") for i in range(5)]
    judgments.write_text("query,product_id,relevance\n" + "\n".join(rows) + "\n")
    settings = CacheBenchSettings(requests=30, concurrency=2, cache_mb=8, max_seconds=30)
    report = run_cache_bench(model_repository, judgments, tmp_path / "out", settings)
    uncached, cached = report["runs"]
    assert report["repeat_rate"] == 0.9 and report["distinct_queries"] == 3
    assert uncached["requests"] == cached["requests"] == 30
    assert uncached["errors"] == cached["errors"] == 0
    assert set(uncached["cache_hit_rate"].values()) == {None}  # no cache, no lookups
    # Every repeat not in flight beside its first occurrence hits.
    assert 0.5 <= cached["cache_hit_rate"]["query_encoder"] <= 0.9
    assert "Throughput with / without" in (tmp_path / "out" / "cache.md").read_text()


def test_bench_encoder_times_both_files_and_checks_agreement(model_repository, tmp_path):
    from ecomsearch.loadtest.encoder_bench import compare_encoders, write_comparison

    queries = load_queries(default_queries())[:24]
    result = compare_encoders({"shipped": model_repository}, queries)
    assert result["reference"] == "shipped:float32"
    assert set(result["ms_per_query"]) == {"shipped:float32", "shipped:int8"}
    assert all(ms > 0 for by_size in result["ms_per_query"].values() for ms in by_size.values())
    assert result["cosine_to_reference"]["shipped:float32"]["min"] == pytest.approx(1.0, abs=1e-5)
    # The int8 encoder is close to float32 but not equal to it, and batch-independent.
    int8 = result["cosine_to_reference"]["shipped:int8"]
    assert 0.99 <= int8["min"] < 0.99999
    assert result["cosine_alone_to_batched_min"]["shipped:int8"] >= 0.99999
    write_comparison(result, tmp_path)
    assert "| shipped:int8 |" in (tmp_path / "encoders.md").read_text()
