"""Real queries through the served `search` ensemble, via the thin client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from ecomsearch import contract
from ecomsearch.client import (
    AsyncSearchClient,
    BadRequestError,
    SearchClient,
    SearchTimeoutError,
    ServiceUnavailableError,
)
from ecomsearch.server.launcher import ServerPorts

pytestmark = pytest.mark.integration


def categories(hits) -> list[str]:
    # Demo catalog ids are "<category>-<number>", e.g. "mouse-00326".
    return [hit.product_id.rsplit("-", 1)[0] for hit in hits]


@pytest.fixture
def client(grpc_url):
    with SearchClient(grpc_url, timeout_s=10) as client:
        yield client


def test_wireless_gaming_mouse_finds_mice(client):
    hits = client.search("wireless gaming mouse", k=10)
    assert len(hits) == 10
    assert categories(hits[:5]) == ["mouse"] * 5, hits
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_nvme_ssd_finds_storage_not_cases(client):
    found = categories(client.search("1tb nvme ssd", k=10))
    assert found[:5] == ["internal-hard-drive"] * 5, found
    assert "case" not in found


def test_explained_hits_add_up_to_their_scores_and_differ_by_product(client):
    from ecomsearch.ranking.explain import explained_total
    from ecomsearch.ranking.features import FEATURE_NAMES

    plain = client.search("wireless gaming mouse", k=5)
    explained = client.search("wireless gaming mouse", k=5, explain=True)
    assert [h.product_id for h in explained] == [h.product_id for h in plain]
    assert all(h.explanation is None for h in plain)
    for hit in explained:
        record = hit.explanation
        assert set(record["contributions"]) == set(FEATURE_NAMES)
        assert record["score"] == pytest.approx(hit.score, abs=1e-5)
        # float32 scores from the served ranker, float64 attributions: equal to 1e-3.
        assert explained_total(record) == pytest.approx(hit.score, abs=1e-3)
    first, last = explained[0].explanation, explained[-1].explanation
    assert first["feature_values"] != last["feature_values"]
    assert first["contributions"] != last["contributions"]


def test_a_rerank_orders_the_best_candidates_by_ranker_score_plus_the_cross_encoders(
    client, model_repository
):
    """Through the real BLS call: select's order under a rerank is the blend that
    ecomsearch.ranking.rerank defines, over the served cross_encoder's logits (here recomputed
    with ONNX Runtime from the same graph and tokenizer)."""
    import numpy as np
    import onnxruntime as ort

    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.ranking.explain import explained_total
    from ecomsearch.ranking.rerank import RERANK_WEIGHT
    from ecomsearch.text import PairTokenizer

    query, depth = "quiet case fan", 8
    ranked = client.search(query, k=depth + 1, rerank_depth=0)
    layout = ModelRepositoryLayout(model_repository)
    arrays = PairTokenizer(layout.tokenizer_dir, contract.CROSS_ENCODER_MAX_TOKENS)(
        [query] * depth, [hit.title for hit in ranked[:depth]]
    )
    names = [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.TOKEN_TYPE_IDS]
    session = ort.InferenceSession(str(layout.cross_encoder_onnx))
    (logits,) = session.run(None, dict(zip(names, arrays, strict=True)))
    blend = np.array([hit.score for hit in ranked[:depth]]) + RERANK_WEIGHT * logits[:, 0]
    expected = [ranked[i].product_id for i in np.argsort(-blend, kind="stable")]

    reranked = client.search(query, k=depth + 1, rerank_depth=depth, explain=True)
    assert [hit.product_id for hit in reranked[:depth]] == expected
    # The ninth, which the cross-encoder did not read, stays last with its ranker score.
    assert reranked[depth].product_id == ranked[depth].product_id
    assert reranked[depth].score == pytest.approx(ranked[depth].score, abs=1e-5)
    assert "rerank" not in reranked[depth].explanation
    ranker_score = {hit.product_id: hit.score for hit in ranked}
    for hit in reranked[:depth]:
        assert hit.score == pytest.approx(
            ranker_score[hit.product_id] + hit.explanation["rerank"], abs=1e-3
        )
        assert explained_total(hit.explanation) == pytest.approx(hit.score, abs=1e-3)
    # Unasked, the CPU profile does not rerank.
    assert [h.product_id for h in client.search(query, k=depth + 1)] == [
        h.product_id for h in ranked
    ]


def test_a_misspelt_word_is_matched_as_the_catalog_spells_it(client):
    # retrieve corrects "wireles" (in no product) to "wireless" for BM25, so a product found
    # by both spellings has the same lexical features; the encoder still reads what was typed.
    lexical = ("bm25_title", "bm25_text", "title_coverage", "text_coverage", "lexical_rank")
    typed = {h.product_id: h for h in client.search("logitech wireles mouse", k=10, explain=True)}
    spelt = {h.product_id: h for h in client.search("logitech wireless mouse", k=10, explain=True)}
    both = typed.keys() & spelt.keys()
    assert len(both) >= 5, (list(typed), list(spelt))
    for product_id in both:
        typed_values = typed[product_id].explanation["feature_values"]
        spelt_values = spelt[product_id].explanation["feature_values"]
        for name in lexical:
            assert typed_values[name] == pytest.approx(spelt_values[name], abs=1e-6), name
    # Products with every word of the query in their text, the corrected one too, are found.
    assert any(h.explanation["feature_values"]["text_coverage"] == 1.0 for h in typed.values())


def test_default_top_k_when_absent(grpc_url):
    import numpy as np
    import tritonclient.grpc as grpcclient

    query = grpcclient.InferInput(contract.QUERY, [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([[b"mechanical keyboard"]], dtype=object))
    with grpcclient.InferenceServerClient(grpc_url) as raw:
        result = raw.infer(contract.SEARCH_MODEL, [query])
    assert result.as_numpy(contract.PRODUCT_IDS).shape == (1, contract.DEFAULT_TOP_K)
    assert result.as_numpy(contract.SCORES).dtype == np.float32


def test_batch_matches_single_queries(client):
    queries = ["wireless gaming mouse", "1tb nvme ssd", "27 inch 4k monitor"]
    batched = client.search_batch(queries, k=5)
    assert [[h.product_id for h in hits] for hits in batched] == [
        [h.product_id for h in client.search(q, k=5)] for q in queries
    ]


def test_batch_longer_than_one_request_is_chunked(client):
    queries = [f"gaming mouse {n}" for n in range(contract.MAX_QUERIES_PER_REQUEST + 6)]
    results = client.search_batch(queries, k=3)
    assert len(results) == len(queries)
    assert all(len(hits) == 3 for hits in results)


def test_async_client_concurrent_queries(grpc_url, client):
    async def run():
        async with AsyncSearchClient(grpc_url, timeout_s=10) as aclient:
            return await asyncio.gather(
                aclient.search("wireless gaming mouse", k=5),
                aclient.search_batch(["1tb nvme ssd", "ddr5 32gb memory kit"], k=5),
            )

    mouse, (ssd, memory) = asyncio.run(run())
    assert [h.product_id for h in mouse] == [
        h.product_id for h in client.search("wireless gaming mouse", k=5)
    ]
    assert categories(ssd)[0] == "internal-hard-drive"
    assert categories(memory)[0] == "memory"


def test_client_rejects_bad_input_before_sending(client):
    for query, k in [
        ("", 5),
        ("   ", 5),
        ("\u200b\x00", 5),
        ("mouse", 0),
        ("mouse", contract.MAX_TOP_K + 1),
    ]:
        with pytest.raises(BadRequestError):
            client.search(query, k=k)


def test_client_timeout_is_typed(grpc_url):
    with SearchClient(grpc_url, timeout_s=1e-6) as fast, pytest.raises(SearchTimeoutError):
        fast.search("wireless gaming mouse")


def test_client_unreachable_server_is_typed():
    address = f"127.0.0.1:{ServerPorts.free().grpc}"
    with SearchClient(address, timeout_s=2) as nowhere, pytest.raises(ServiceUnavailableError):
        nowhere.search("wireless gaming mouse")


def test_cli_search_prints_mice(grpc_url):
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "ecomsearch"),
            "search",
            "wireless gaming mouse",
            "-k",
            "3",
            "--url",
            grpc_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all("mouse-" in line for line in lines), completed.stdout
