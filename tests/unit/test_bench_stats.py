"""The benchmark's CPU accounting: Triton's statistics per row and the server's CPU time."""

from __future__ import annotations

import os
import time

import pytest

from ecomsearch.loadtest.load import LoadResult
from ecomsearch.loadtest.report import BenchReport, target_ratios
from ecomsearch.loadtest.triton_stats import breakdown, stage_compute_per_row_us
from ecomsearch.server.processes import group_cpu_seconds


def counters(requests: int, rows: int, executions: int, request_compute_ns: int, execution_ns: int):
    return {
        "inference_count": rows,
        "execution_count": executions,
        "requests": requests,
        "queue_ns": 1000 * requests,
        "compute_input_ns": 0,
        "compute_infer_ns": request_compute_ns,
        "compute_output_ns": 0,
        "execution_compute_ns": execution_ns,
    }


def test_compute_per_row_charges_each_execution_once() -> None:
    # 6 one-row requests in 2 executions of 3 rows, 9 ms each: every request waited 9 ms of
    # compute, but each row cost the stage 3 ms.
    before = {"encoder": counters(0, 0, 0, 0, 0), "search": counters(0, 0, 0, 0, 0)}
    after = {
        "encoder": counters(6, 6, 2, 6 * 9_000_000, 2 * 9_000_000),
        "search": counters(6, 6, 6, 6 * 20_000_000, 6 * 20_000_000),
    }
    stages = breakdown(before, after)
    assert stages["encoder"]["compute_us"] == 9000.0
    assert stages["encoder"]["compute_per_row_us"] == 3000.0
    assert stages["encoder"]["rows_per_execution"] == 3.0
    # The ensemble's own compute is its steps': not added again.
    assert stage_compute_per_row_us(stages, "search") == 3000.0


def test_the_targets_include_the_cpu_per_query() -> None:
    import numpy as np

    report = BenchReport(settings={"ensemble": "search"})
    stages = {
        "encoder": {"compute_per_row_us": 1500.0},
        "retrieve": {"compute_per_row_us": 2000.0},
        "search": {"compute_per_row_us": 9000.0},
    }
    report.add(LoadResult("triton", 16, np.full(100, 10.0), 0, 1.0), stages, 4.2)
    cpu_rows = {what: value for what, value, _ in target_ratios(report.runs) if "CPU" in what}
    assert sorted(cpu_rows.values()) == [3.5, 4.2]


def test_group_cpu_seconds_counts_the_work_of_the_group() -> None:
    group = os.getpgid(0)
    before = group_cpu_seconds(group)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert group_cpu_seconds(group) - before >= 0.2
    assert group_cpu_seconds(2**22 + 12345) == 0.0  # no such group


def test_the_replay_draws_queries_in_proportion_to_their_judged_rows(tmp_path) -> None:
    from collections import Counter

    from ecomsearch.loadtest.cache_bench import query_counts, repeat_rate, replay_stream

    judgments = tmp_path / "judgments.csv"
    rows = ["query,product_id,relevance"]
    rows += [f"door hinge,p{i},3" for i in range(9)] + ["brass knob,p1,2"]
    judgments.write_text("\n".join(rows) + "\n")
    counts = query_counts(judgments)
    assert counts == Counter({"door hinge": 9, "brass knob": 1})
    stream = replay_stream(counts, 2000, seed=1)
    assert replay_stream(counts, 2000, seed=1) == stream  # one seed, one stream
    share = stream.count("door hinge") / len(stream)
    assert 0.87 < share < 0.93
    assert repeat_rate(stream) == 1 - 2 / 2000
    assert repeat_rate(["a", "b", "a", "c"]) == 0.25


def test_a_stream_replayed_in_order_sends_each_query_once() -> None:
    from ecomsearch.loadtest.load import closed_loop

    sent: list[str] = []
    stream = [f"q{i}" for i in range(50)]
    result = closed_loop(
        "stream", lambda: sent.append, stream, 4, 1000, 10.0, warmup_requests=0, in_order=True
    )
    assert result.requests == 50 and sorted(sent) == sorted(stream)


def test_the_hit_rate_comes_from_the_cache_counters() -> None:
    before = {"encoder": {**counters(0, 0, 0, 0, 0), "cache_hits": 0, "cache_misses": 0}}
    after = {"encoder": {**counters(10, 10, 4, 10, 4), "cache_hits": 6, "cache_misses": 4}}
    assert breakdown(before, after)["encoder"]["cache_hit_rate"] == 0.6


def test_bench_gpu_refuses_without_a_gpu_before_doing_anything(monkeypatch, caplog) -> None:
    from ecomsearch import cli
    from ecomsearch.loadtest import bench

    monkeypatch.setattr(bench, "visible_gpus", lambda: [])
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("must not run"))
    assert cli.main(["bench", "--gpu"]) == 2
    assert "needs an NVIDIA GPU" in caplog.text


def test_the_gpu_bench_serves_the_gpu_profile(monkeypatch, tmp_path) -> None:
    from ecomsearch.loadtest import bench
    from ecomsearch.server import launcher

    started = []

    class Recorder:
        @classmethod
        def local(cls, repository, log_path, **options):
            started.append(options)
            raise RuntimeError("stop here")

    monkeypatch.setattr(launcher, "TritonServer", Recorder)
    settings = bench.BenchSettings(systems=("triton",), profile="gpu")
    with pytest.raises(RuntimeError, match="stop here"):
        bench.run_bench(tmp_path, ["q"], tmp_path / "out", settings)
    assert started == [{"model_config_name": "gpu"}]


def test_cpu_by_process_names_each_process_and_sums_to_the_group() -> None:

    from ecomsearch.server.processes import cpu_seconds_by_process

    group = os.getpgid(0)
    before = cpu_seconds_by_process(group)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = cpu_seconds_by_process(group)
    # This process is named after its argv[0] (pytest, or python); a stub by its model.
    assert any(after[name] - before.get(name, 0.0) >= 0.2 for name in after), after
    assert sum(after.values()) == pytest.approx(group_cpu_seconds(group), abs=0.05)


class ScriptedPipeline:
    """Charges each batch a fixed CPU time per stage: a fixed cost a batch for `select`, a
    cost a query for `query_encoder`, and `retrieve` slower on the first pass."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.passes_seen = 0

    def search(self, queries, k, stage_cpu_s=None):
        self.batches.append(list(queries))
        stage_cpu_s["query_encoder"] = stage_cpu_s.get("query_encoder", 0.0) + 0.002 * len(queries)
        stage_cpu_s["select"] = stage_cpu_s.get("select", 0.0) + 0.004
        first_pass = len(self.batches) <= 2
        stage_cpu_s["retrieve"] = stage_cpu_s.get("retrieve", 0.0) + (0.1 if first_pass else 0.0)
        return [[] for _ in queries]


def test_compute_floor_prices_each_stage_per_query_at_each_batch_size() -> None:
    from ecomsearch.loadtest.bench import compute_floor

    pipeline = ScriptedPipeline()
    queries = [f"q{i}" for i in range(9)]
    floor = compute_floor(pipeline, queries, k=10, batch_sizes=(1, 4, 16), passes=2)
    # 16 is more than the queries: not priced. 4 runs the 8 queries of two full batches.
    assert list(floor) == [1, 4]
    assert all(len(batch) == 4 for batch in pipeline.batches[-2:])
    # The encoder's cost is per query; select's per batch, shared by its queries; the best
    # pass is kept (retrieve cost only on the very first two batches).
    assert floor[4] == {"query_encoder": 2.0, "select": 1.0, "retrieve": 0.0}
    assert floor[1]["query_encoder"] == 2.0 and floor[1]["select"] == 4.0
    assert floor[1]["retrieve"] == 0.0


def test_compute_floor_is_reported_with_its_total() -> None:
    from ecomsearch.loadtest.report import markdown

    report = BenchReport(settings={})
    report.compute_floor = {1: {"query_encoder": 2.25, "retrieve": 1.5}}
    assert "| 1 | 2.25 | 1.50 | 3.75 |" in markdown(report)
