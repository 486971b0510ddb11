"""Hand-written PC-parts queries over the full demo catalog: a smoke-level relevance check of
the whole served pipeline (retrieval, ranker and all), not a benchmark."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecomsearch.client import SearchClient
from ecomsearch.paths import default_cache_dir, demo_catalog
from ecomsearch.server.launcher import TritonServer
from ecomsearch.workspace import catalog_repository

from .conftest import SOURCE_REPOSITORY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUERIES = json.loads((Path(__file__).parent / "pc_parts_smoke_queries.json").read_text())
TOP = 5
# A query passes when its first hit and at least 3 of its top 5 meet the expectation; the set
# passes when nearly all do (a smoke test, tolerant of one or two debatable queries).
REQUIRED_PASS_RATE = 0.9


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[TritonServer]:
    # The embedding cache is shared with `make serve`, so this costs minutes only once.
    repository, _ = catalog_repository(demo_catalog(), default_cache_dir(), SOURCE_REPOSITORY)
    log_path = tmp_path_factory.mktemp("demo-logs") / "tritonserver.log"
    with TritonServer.local(repository, log_path) as server:
        yield server


def meets(expectation: dict, product_id: str, title: str) -> bool:
    category_ok = product_id.rsplit("-", 1)[0] == expectation.get(
        "category", product_id.rsplit("-", 1)[0]
    )
    brand = expectation.get("brand")
    return category_ok and (brand is None or title.lower().startswith(brand.lower()))


def test_smoke_queries_file_is_well_formed():
    assert 30 <= len(QUERIES) <= 50
    assert len({q["query"] for q in QUERIES}) == len(QUERIES)
    assert all(set(q) <= {"query", "category", "brand"} and len(q) >= 2 for q in QUERIES)


def test_hand_written_pc_parts_queries(demo_server):
    with SearchClient(demo_server.grpc_url, timeout_s=30) as client:
        results = client.search_batch([q["query"] for q in QUERIES], k=TOP)
    failures = []
    for expectation, hits in zip(QUERIES, results, strict=True):
        matched = [meets(expectation, h.product_id, h.title) for h in hits]
        if not (matched and matched[0] and sum(matched) >= 3):
            failures.append(f"{expectation} -> {[(h.product_id, h.title) for h in hits]}")
    pass_rate = 1 - len(failures) / len(QUERIES)
    print(f"smoke relevance: {len(QUERIES) - len(failures)}/{len(QUERIES)} queries pass")
    assert pass_rate >= REQUIRED_PASS_RATE, "\n".join(failures)
