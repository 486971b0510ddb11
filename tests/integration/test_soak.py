"""A short version of `ecomsearch soak` (the 30-minute run is a command of its own, its figures
in docs/reliability.md): open loop at 70% of the measured saturation, every request answered,
the memory of tritonserver and of every stub sampled."""

from __future__ import annotations

import pytest

from ecomsearch.loadtest.bench import load_queries
from ecomsearch.loadtest.overload import measure_saturation_rps
from ecomsearch.loadtest.soak import run_soak
from ecomsearch.paths import default_queries
from ecomsearch.server.processes import group_members, stubs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Far above what 15 s can leak through normal allocator growth (the 30-minute run grew 8.6 MiB
# in all), far below what a leak of each request's tensors would add.
GROWTH_LIMIT_MIB = 64.0


def test_a_short_soak_at_seventy_percent_answers_everything(triton_server) -> None:
    queries = load_queries(default_queries())
    saturation = measure_saturation_rps(triton_server.grpc_url, queries, 16, 4.0).throughput_rps
    report = run_soak(
        triton_server.grpc_url,
        triton_server.process.pid,
        queries,
        fraction=0.7,
        duration_s=15.0,
        sample_every_s=3.0,
        warmup_s=3.0,
        saturation_rps=saturation,
    )
    load = report["load"]
    assert load["offered"] >= 0.7 * saturation * 15 * 0.95, load
    assert load["shed"] == 0 and load["past_deadline"] == 0 and load["errors"] == 0, load
    instances = {s.instance for s in stubs(group_members(triton_server.process.pid)) if s.alive}
    assert {"tritonserver", *instances} <= set(report["rss_growth_mib"]), report["rss_growth_mib"]
    assert report["rss_growth_total_mib"] < GROWTH_LIMIT_MIB, report["rss_growth_mib"]
