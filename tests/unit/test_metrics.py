"""Ranking metrics, the judgments reader, the query split and the ranker's listwise loss, on
cases small enough to work out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.evaluation.metrics import (
    Judgments,
    JudgmentsError,
    dcg,
    evaluate,
    ndcg_at,
    read_judgments,
    recall_at,
    reciprocal_rank_at,
)
from ecomsearch.evaluation.splits import is_validation_query, split_queries

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)


def test_dcg() -> None:
    # gains [2, 0, 1]: 2/log2(2) + 0/log2(3) + 1/log2(4) = 2 + 0 + 0.5
    assert dcg([2, 0, 1]) == pytest.approx(2.5)
    assert dcg([]) == 0.0


def test_ndcg_at_10() -> None:
    gains = {"a": 2.0, "b": 0.0, "c": 1.0}
    # DCG 2.5 as above; ideal order [2, 1, 0]: 2/1 + 1/log2(3) = 2.6309297535714574
    assert ndcg_at(["a", "b", "c"], gains) == pytest.approx(2.5 / (2 + 1 / LOG2_3))
    assert ndcg_at(["a", "b", "c"], gains) == pytest.approx(0.9502344167898356)
    assert ndcg_at(["a", "c", "b"], gains) == pytest.approx(1.0)


def test_ndcg_unjudged_products_gain_nothing() -> None:
    # "x" is unjudged: [0, 2] -> 2/log2(3) = 1.2618595; ideal [2] -> 2
    assert ndcg_at(["x", "a"], {"a": 2.0}) == pytest.approx(1 / LOG2_3)
    assert ndcg_at(["x", "y"], {"a": 2.0}) == 0.0


def test_ndcg_counts_only_the_first_10() -> None:
    ranked = [f"x{i}" for i in range(10)] + ["a"]
    assert ndcg_at(ranked, {"a": 1.0}) == 0.0
    assert ndcg_at(ranked, {"a": 1.0}, cutoff=11) == pytest.approx(1 / math.log2(12))


def test_ndcg_without_any_gain_is_zero() -> None:
    assert ndcg_at(["a", "b"], {"a": 0.0}) == 0.0


def test_recall_at_100() -> None:
    ranked = ["a", *[f"x{i}" for i in range(98)], "c", "d"]  # c is 100th, d 101st
    assert recall_at(ranked, {"a", "b", "c", "d"}) == pytest.approx(2 / 4)
    assert recall_at(ranked, set()) == 0.0


def test_mrr_at_10() -> None:
    assert reciprocal_rank_at(["x", "y", "a", "b"], {"a", "b"}) == pytest.approx(1 / 3)
    assert reciprocal_rank_at([f"x{i}" for i in range(10)] + ["a"], {"a"}) == 0.0
    assert reciprocal_rank_at([], {"a"}) == 0.0


def write_judgments(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_evaluate_averages_over_queries_with_a_relevant_product(tmp_path: Path) -> None:
    judgments = read_judgments(
        write_judgments(
            tmp_path / "judgments.csv",
            [
                "query,product_id,relevance",
                "drill,a,3",
                "drill,b,0",
                "drill,c,2",
                "hose,x,1",  # best grade 1 < half the 0..3 scale: no relevant product
                "hose,y,0",
                "saw,m,2",  # never ranked: counts as zero
            ],
        )
    )
    assert (judgments.lowest, judgments.highest, judgments.relevant_gain) == (0, 3, 1.5)
    assert judgments.evaluable_queries() == ["drill", "saw"]

    metrics = evaluate({"drill": ["b", "a", "z", "c"], "hose": ["x"]}, judgments)

    # drill: gains [0, 3, 0, 2] -> DCG 3/log2(3) + 2/log2(5) = 2.7541424;
    #        ideal [3, 2, 0] -> 3 + 2/log2(3) = 4.2618595; NDCG 0.6462302
    #        relevant {a, c}: recall 2/2, first relevant at rank 2: RR 1/2
    # saw:   all zero. Means over the 2 evaluable queries:
    drill_ndcg = (3 / LOG2_3 + 2 / LOG2_5) / (3 + 2 / LOG2_3)
    assert drill_ndcg == pytest.approx(0.6462302129493455)
    assert metrics.queries == 2
    assert metrics.ndcg_at_10 == pytest.approx(drill_ndcg / 2)
    assert metrics.recall_at_100 == pytest.approx(0.5)
    assert metrics.mrr_at_10 == pytest.approx(0.25)
    assert metrics.as_dict()["queries"] == 2


def test_gains_are_relative_to_the_lowest_grade(tmp_path: Path) -> None:
    judgments = read_judgments(
        write_judgments(
            tmp_path / "j.csv",
            ["query,product_id,relevance", "q,a,1", "q,b,3", "r,c,2"],
        )
    )
    # Grades 1..3: gains 0..2, relevant from gain 1 (grade 2).
    assert judgments.gains("q") == {"a": 0.0, "b": 2.0}
    assert judgments.relevant_gain == 1.0
    assert judgments.evaluable_queries() == ["q", "r"]


def test_read_judgments_normalises_whitespace_and_keeps_a_repeated_pairs_last_grade(
    tmp_path: Path,
) -> None:
    judgments = read_judgments(
        write_judgments(
            tmp_path / "j.csv",
            [
                "query,product_id,relevance",
                "  cordless   drill ,a,1",
                "cordless drill, a ,3",
                "x,b,0",
            ],
        )
    )
    assert judgments.grades == {"cordless drill": {"a": 3.0}, "x": {"b": 0.0}}


def test_evaluate_without_an_evaluable_query_raises() -> None:
    judgments = Judgments({"q": {"a": 0.0, "b": 1.0}}, lowest=0.0, highest=3.0)
    with pytest.raises(JudgmentsError, match="no query has a relevant"):
        evaluate({"q": ["a"]}, judgments)


def test_restricted_to_keeps_the_scale() -> None:
    judgments = Judgments({"q": {"a": 0.0}, "r": {"b": 3.0}}, lowest=0.0, highest=3.0)
    restricted = judgments.restricted_to(["q"])
    assert restricted.grades == {"q": {"a": 0.0}}
    assert (restricted.lowest, restricted.highest) == (0.0, 3.0)


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        pytest.param(
            ["query,product_id,grade", "q,a,1"], ["header lacks", "'relevance'"], id="header"
        ),
        pytest.param(
            ["query,product_id,relevance", "q,a,1", "q,b,high"],
            ["line 3", "'high'", "not a number"],
            id="non-numeric",
        ),
        pytest.param(
            ["query,product_id,relevance", "q,a,1", "r,b,nan"], ["line 3"], id="nan-grade"
        ),
        pytest.param(
            ["query,product_id,relevance", "q,a,1", " ,b,2"], ["line 3", "empty"], id="empty-query"
        ),
        pytest.param(
            ["query,product_id,relevance", "q,a,2", "r,b,2"],
            ["every judgment has grade 2"],
            id="constant-grades",
        ),
        pytest.param(["query,product_id,relevance"], ["no judgments"], id="no-rows"),
    ],
)
def test_read_judgments_errors(tmp_path: Path, lines: list[str], fragments: list[str]) -> None:
    path = write_judgments(tmp_path / "judgments.csv", lines)
    with pytest.raises(JudgmentsError) as raised:
        read_judgments(path)
    message = str(raised.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# The query split.

QUERIES = [f"query number {i}" for i in range(1000)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, validation = split_queries(QUERIES)
    assert split_queries(QUERIES) == (train, validation)
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(QUERIES)
    # Each side keeps input order.
    assert train == [q for q in QUERIES if q in set(train)]
    # A query's side depends on the query alone, not on the others.
    assert split_queries(list(reversed(QUERIES)))[1] == list(reversed(validation))
    assert split_queries(QUERIES[:10])[1] == [q for q in QUERIES[:10] if q in set(validation)]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_takes_roughly_the_fraction(fraction: float) -> None:
    _, validation = split_queries(QUERIES, fraction=fraction)
    # Binomial: the standard deviation is at most 16 queries of 1000; allow about 3 of them.
    assert abs(len(validation) - fraction * len(QUERIES)) <= 50


def test_split_depends_on_the_seed_and_honours_the_extremes() -> None:
    assert split_queries(QUERIES, seed=1) != split_queries(QUERIES, seed=2)
    assert split_queries(QUERIES, fraction=0.0) == (QUERIES, [])
    assert split_queries(QUERIES, fraction=1.0) == ([], QUERIES)
    assert is_validation_query("drill", seed=5) == is_validation_query("drill", seed=5)


# listnet_loss.


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def loss(torch, scores, gains, valid=None) -> float:
    from ecomsearch.ranking.model import listnet_loss

    scores_t = torch.tensor(scores, dtype=torch.float32)
    gains_t = torch.tensor(gains, dtype=torch.float32)
    valid_t = torch.ones_like(scores_t, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return float(listnet_loss(scores_t, gains_t, valid_t))


def test_listnet_hand_computed(torch) -> None:
    # gains [1, 0] -> target 2^g - 1 = [1, 0]; equal scores -> softmax [1/2, 1/2]; -log(1/2)
    assert loss(torch, [[0.0, 0.0]], [[1.0, 0.0]]) == pytest.approx(math.log(2))


def test_listnet_is_lower_when_scores_order_candidates_by_gain(torch) -> None:
    gains = [[2.0, 1.0, 0.0, 0.0]]
    right = loss(torch, [[3.0, 2.0, 1.0, 0.0]], gains)
    wrong = loss(torch, [[0.0, 1.0, 2.0, 3.0]], gains)
    flat = loss(torch, [[1.0, 1.0, 1.0, 1.0]], gains)
    assert right < flat < wrong


def test_listnet_ignores_padding(torch) -> None:
    base = loss(torch, [[3.0, 2.0, 1.0]], [[2.0, 1.0, 0.0]])
    # A padding slot with a huge score and a big gain changes nothing.
    padded = loss(
        torch,
        [[3.0, 2.0, 100.0, 1.0]],
        [[2.0, 1.0, 5.0, 0.0]],
        [[True, True, False, True]],
    )
    assert padded == pytest.approx(base, rel=1e-6)


def test_listnet_skips_queries_without_signal(torch) -> None:
    first = loss(torch, [[3.0, 2.0, 1.0]], [[2.0, 1.0, 0.0]])
    # The second query has no gain among its real candidates (its gain sits in padding).
    both = loss(
        torch,
        [[3.0, 2.0, 1.0], [0.0, 5.0, 1.0]],
        [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
        [[True, True, True], [True, True, False]],
    )
    assert both == pytest.approx(first, rel=1e-6)


def test_listnet_without_any_signal_is_zero_and_differentiable(torch) -> None:
    from ecomsearch.ranking.model import listnet_loss

    scores = torch.tensor([[1.0, 2.0]], requires_grad=True)
    value = listnet_loss(scores, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))
    assert float(value.detach()) == 0.0
    value.backward()
    assert np.array_equal(scores.grad.numpy(), np.zeros((1, 2)))
