"""TREC files, per-query scores and paired tests, checked against ranx and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecomsearch.evaluation.harness import load_judgments
from ecomsearch.evaluation.metrics import Judgments, evaluate
from ecomsearch.evaluation.trec import (
    METRICS,
    RankedHit,
    TrecFormatError,
    compare_paired,
    integer_gain_scale,
    per_query_scores,
    query_ids,
    randomization_p_value,
    read_qrels,
    read_run,
    read_topics,
    write_qrels,
    write_run,
    write_topics,
)

ranx = pytest.importorskip("ranx")


def random_case(seed: int, queries: int = 40, docs: int = 60):
    """Integer grades 0..3 (relevant from 2, as half the scale) and a scored run per query."""
    rng = np.random.default_rng(seed)
    grades: dict[str, dict[str, float]] = {}
    rankings: dict[str, list[RankedHit]] = {}
    for q in range(queries):
        judged = rng.choice(docs, size=rng.integers(1, 12), replace=False)
        grades[f"query {q}"] = {f"d{d}": float(rng.integers(0, 4)) for d in judged}
        retrieved = rng.choice(docs, size=rng.integers(0, 40), replace=False)
        scores = np.sort(rng.random(len(retrieved)))[::-1]
        rankings[f"query {q}"] = [
            RankedHit(f"d{d}", float(s)) for d, s in zip(retrieved, scores, strict=True)
        ]
    grades["query 0"]["d0"] = 3.0  # at least one relevant judgment, and the scale's top
    grades["query 1"]["d1"] = 0.0  # and its bottom
    return Judgments(grades, 0.0, 3.0), rankings


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_ranx_on_the_written_files(tmp_path, seed):
    judgments, rankings = random_case(seed)
    qids = query_ids(list(judgments.grades))
    write_run(tmp_path / "run.trec", rankings, qids, "test")
    assert write_qrels(tmp_path / "qrels.txt", judgments, qids) == 1
    ours = per_query_scores(
        {q: [h.product_id for h in hits] for q, hits in rankings.items()}, judgments
    )
    means = evaluate({q: [h.product_id for h in hits] for q, hits in rankings.items()}, judgments)

    qrels = ranx.Qrels.from_file(str(tmp_path / "qrels.txt"), kind="trec")
    run = ranx.Run.from_file(str(tmp_path / "run.trec"), kind="trec")
    # ranx: "ndcg" is the linear-gain form used here; "-l2" counts grade >= 2 as relevant.
    theirs = {
        "ndcg@10": "ndcg@10",
        "recall@100": "recall@100-l2",
        "mrr@10": "mrr@10-l2",
    }
    for metric, ranx_metric in theirs.items():
        per_query = ranx.evaluate(qrels, run, ranx_metric, return_mean=False, make_comparable=True)
        by_qid = dict(zip(sorted(qrels.keys()), per_query, strict=True))
        evaluable = {qids[q]: s for q, s in ours[metric].items()}
        for qid, score in evaluable.items():
            assert by_qid[qid] == pytest.approx(score, abs=1e-6), (metric, qid)
    assert means.ndcg_at_10 == pytest.approx(np.mean(list(ours["ndcg@10"].values())))


def test_fractional_grades_are_scaled_to_whole_numbers_without_changing_ndcg(tmp_path):
    judgments = Judgments(
        {"a": {"x": 1.0, "y": 2.33, "z": 3.0}, "b": {"x": 1.67, "w": 2.67}}, 1.0, 3.0
    )
    assert integer_gain_scale(judgments) == 3
    qids = query_ids(list(judgments.grades))
    write_qrels(tmp_path / "qrels", judgments, qids)
    write_topics(tmp_path / "topics", qids)
    back = read_qrels(tmp_path / "qrels", read_topics(tmp_path / "topics"))
    assert back.grades["a"] == {"x": 0.0, "y": 4.0, "z": 6.0}
    rankings = {"a": ["z", "x", "y"], "b": ["w", "x"]}
    assert evaluate(rankings, back).ndcg_at_10 == pytest.approx(
        evaluate(rankings, judgments).ndcg_at_10, abs=1e-3
    )


def test_run_files_read_back_in_the_served_order_even_with_tied_scores(tmp_path):
    hits = [RankedHit("b", 0.5), RankedHit("a", 0.5), RankedHit("c", 0.5), RankedHit("d", 0.1)]
    # Different floats that print the same at nine digits (a float32 score next to its
    # rounded neighbour) are a tie in the file, and must be told apart too.
    hits += [RankedHit("e", 0.0999999999), RankedHit("f", 0.0999999998)]
    write_run(tmp_path / "run", {"q": hits}, {"q": "7"}, "tied")
    assert read_run(tmp_path / "run") == {"7": ["b", "a", "c", "d", "e", "f"]}
    lines = (tmp_path / "run").read_text().splitlines()
    assert lines[0].split()[:4] == ["7", "Q0", "b", "1"] and lines[0].split()[5] == "tied"


def test_malformed_files_name_their_line(tmp_path):
    (tmp_path / "run").write_text("1 Q0 a 1 0.5 x\n1 Q0 b 2 high x\n")
    with pytest.raises(TrecFormatError, match="line 2"):
        read_run(tmp_path / "run")
    (tmp_path / "qrels").write_text("1 0 a 1\n9 0 b 2\n")
    with pytest.raises(TrecFormatError, match="qid '9' has no topic"):
        read_qrels(tmp_path / "qrels", {"1": "some query"})
    (tmp_path / "topics").write_text("1 no tab here\n")
    with pytest.raises(TrecFormatError, match="line 1"):
        read_topics(tmp_path / "topics")


def test_qrels_and_topics_load_as_judgments_keyed_by_text(tmp_path):
    (tmp_path / "topics").write_text("q1\tcordless drill\nq2\tdeck  screws\n")
    (tmp_path / "qrels").write_text("q1 0 p1 2\nq1 0 p2 0\nq2 0 p3 1\n")
    judgments, qids = load_judgments(None, tmp_path / "qrels", tmp_path / "topics")
    assert judgments.grades == {
        "cordless drill": {"p1": 2.0, "p2": 0.0},
        "deck screws": {"p3": 1.0},
    }
    assert qids == {"cordless drill": "q1", "deck screws": "q2"}
    with pytest.raises(ValueError, match="topics"):
        load_judgments(None, tmp_path / "qrels", None)


def test_identical_runs_are_not_significantly_different():
    scores = {f"q{i}": i / 10 for i in range(10)}
    result = compare_paired(scores, dict(scores), METRICS[0])
    assert result.mean_difference == 0 and result.randomization_p == 1.0 and result.t_test_p == 1.0


def test_a_consistent_gain_is_significant_and_a_noisy_one_is_not():
    rng = np.random.default_rng(0)
    a = {f"q{i}": float(v) for i, v in enumerate(rng.random(200))}
    better = {q: v + 0.05 + rng.normal(0, 0.02) for q, v in a.items()}
    noisy = {q: v + rng.normal(0, 0.3) for q, v in a.items()}
    assert compare_paired(a, better, "ndcg@10").randomization_p < 0.001
    assert compare_paired(a, noisy, "ndcg@10").randomization_p > 0.05


@settings(max_examples=25, deadline=None)
# Per-query metric differences, to three decimals: ties between sign flips are then exact, as
# they are between real NDCG values, rather than decided by float noise.
@given(st.lists(st.floats(-1, 1).map(lambda x: round(x, 3)), min_size=5, max_size=40))
def test_randomisation_p_agrees_with_scipys_exact_permutation_test(differences):
    from scipy import stats

    values = np.array(differences)
    if not np.any(values):
        assert randomization_p_value(values) == 1.0
        return
    exact = stats.permutation_test(
        (values,),
        np.mean,
        permutation_type="samples",
        n_resamples=20_000,
        alternative="two-sided",
        random_state=0,
    ).pvalue
    assert randomization_p_value(values, permutations=20_000) == pytest.approx(exact, abs=0.03)
