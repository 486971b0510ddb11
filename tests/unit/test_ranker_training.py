"""The ranker's export (the same verified path as the encoder's), its model card, and
`train_and_export` end to end on a small real catalog with the exporter passed in."""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest

from ecomsearch import contract
from ecomsearch.export import encoder as encoder_export
from ecomsearch.export.onnx import OPSET
from ecomsearch.export.ranker import export_ranker, export_search_ranker
from ecomsearch.paths import ModelRepositoryLayout, demo_catalog, prepare_model_repository
from ecomsearch.ranking.card import render_model_card
from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES
from tests.project import MODEL_REPOSITORY


def tiny_ranker():
    import torch

    from ecomsearch.ranking.model import Ranker

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return Ranker(rng.normal(size=FEATURE_COUNT), rng.uniform(0.5, 2, size=FEATURE_COUNT)).eval()


TRAINING_INFO = {
    "trained_at": "2026-01-01T00:00:00+00:00",
    "training_data": {
        "catalog": "/data/shop/catalog.jsonl",
        "judgments": "/data/shop/judgments.csv",
        "description": "",
        "grade_scale": [0.0, 4.0],
    },
    "seed": 5,
    "recall_weight": 0.0,
    "validation_fraction": 0.2,
    "counts": {
        "fit_queries": 10,
        "early_stop_queries": 2,
        "validation_queries": 3,
        "catalog_products": 1234,
    },
    "best_epoch": 1,
    "epochs_run": 2,
    "candidate_pools": {"vector": 200, "lexical": 200},
    "validation_in_process": {
        "retrieval": {"ndcg_at_10": 0.1, "recall_at_100": 0.2, "mrr_at_10": 0.3, "queries": 3},
        "ranked": {"ndcg_at_10": 0.4, "recall_at_100": 0.5, "mrr_at_10": 0.6, "queries": 3},
    },
}


def test_the_ranker_export_is_verified_and_records_what_it_checked(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    layout = ModelRepositoryLayout(tmp_path)
    model = tiny_ranker()

    record = export_ranker(model, layout, TRAINING_INFO)

    assert json.loads(layout.ranker_info.read_text()) == record
    assert record["feature_names"] == list(FEATURE_NAMES)
    assert record["opset"] == OPSET
    assert 0 <= record["max_abs_difference"] <= 1e-4
    graph = onnx.load(str(layout.ranker_onnx))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    assert [i.name for i in graph.graph.input] == [contract.CANDIDATE_FEATURES]
    assert [o.name for o in graph.graph.output] == [contract.RANKING_SCORES]
    axes = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert axes == ["batch", "candidates", ""]
    features = np.random.default_rng(3).normal(size=(4, 9, FEATURE_COUNT)).astype(np.float32)
    (scores,) = ort.InferenceSession(str(layout.ranker_onnx)).run(
        None, {"candidate_features": features}
    )
    with torch.inference_mode():
        expected = model(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_both_exports_share_one_opset() -> None:
    assert "OPSET" not in vars(encoder_export) or encoder_export.OPSET is OPSET
    encoder = ModelRepositoryLayout(MODEL_REPOSITORY)
    shipped = onnx.load(str(encoder.ranker_onnx))
    assert [o.version for o in shipped.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]


def test_the_model_card_states_what_was_trained() -> None:
    record = {**TRAINING_INFO, "feature_names": list(FEATURE_NAMES), "opset": 99}
    card = render_model_card(record)
    assert "ONNX opset 99" in card
    assert "Home Depot" not in card
    assert "`catalog.jsonl`" in card and "`judgments.csv`" in card
    assert "--data-description" in card
    assert "1,234 products; judgments graded from 0 (irrelevant) to 4" in card
    described = {**record, "training_data": {**record["training_data"], "description": "A shop."}}
    assert "A shop." in render_model_card(described)
    assert "--data-description" not in render_model_card(described)


def test_the_shipped_card_is_the_rendering_of_the_shipped_record() -> None:
    layout = ModelRepositoryLayout(MODEL_REPOSITORY)
    record = json.loads(layout.ranker_info.read_text())
    assert layout.ranker_card.read_text() == render_model_card(record)


def small_judged_catalog(directory: Path) -> tuple[Path, Path]:
    """Twelve products of each of four demo categories, and judgments that a query naming a
    category wants its products (grade 3) and not the others' (grade 1)."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    with gzip.open(demo_catalog(), "rt", encoding="utf-8") as stream:
        for line in stream:
            product = json.loads(line)
            category = product["category_path"][-1]
            if (
                category in ("Mice", "Keyboards", "Monitors", "Headphones")
                and len(by_category[category]) < 12
            ):
                by_category[category].append(product)
    catalog = directory / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(p) + "\n" for ps in by_category.values() for p in ps))
    judgments = directory / "judgments.csv"
    with open(judgments, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["query", "product_id", "relevance"])
        for category in by_category:
            for adjective in ("wireless", "black", "gaming", "cheap", "best", "small"):
                query = f"{adjective} {category.lower()}"
                for other, others in by_category.items():
                    for product in others[:4]:
                        writer.writerow([query, product["id"], 3 if other == category else 1])
    return catalog, judgments


def judged_repository(tmp_path: Path) -> tuple[ModelRepositoryLayout, Path, Path]:
    """A model repository serving the project's exported encoders (symlinked, so the training
    commands mine and featurise with the real one), and small_judged_catalog's files."""
    layout = ModelRepositoryLayout(prepare_model_repository(tmp_path / "repository"))
    source = ModelRepositoryLayout(MODEL_REPOSITORY)
    if not source.encoder_onnx.is_file():
        pytest.fail("the exported encoder is missing: `make test` exports it first")
    layout.encoder_onnx.symlink_to(source.encoder_onnx)
    layout.encoder_int8_onnx.symlink_to(source.encoder_int8_onnx)
    layout.tokenizer_dir.symlink_to(source.tokenizer_dir, target_is_directory=True)
    layout.cross_encoder_onnx.symlink_to(source.cross_encoder_onnx)
    return (layout, *small_judged_catalog(tmp_path))


@pytest.mark.slow
def test_train_and_export_uses_the_exporter_it_is_given(tmp_path: Path) -> None:
    from ecomsearch.ranking.training import train_and_export

    layout, catalog, judgments = judged_repository(tmp_path)
    calls = []

    def exporter(model, target, info):
        calls.append(target)
        return export_search_ranker(model, target, info)

    result = train_and_export(
        catalog,
        judgments,
        layout,
        cache_dir=tmp_path / "cache",
        export=exporter,
        validation_fraction=0.3,
        data_description="Made-up judgments over the demo catalog.",
    )

    assert calls == [layout]
    assert result.export["opset"] == OPSET
    card = layout.ranker_card.read_text()
    assert "Made-up judgments over the demo catalog." in card
    assert f"ONNX opset {OPSET}" in card
    recorded = json.loads(layout.ranker_info.read_text())
    assert recorded["training_data"]["grade_scale"] == [1.0, 3.0]
    assert result.validation["ranked"].queries == result.counts["validation_queries"] > 0


def synthetic_examples(queries: int, seed: int):
    """Candidates whose gain follows two of the features (plus noise), in ExampleSet form."""
    from ecomsearch.ranking.training import ExampleSet

    rng = np.random.default_rng(seed)
    width = 30
    features = rng.normal(size=(queries, width, FEATURE_COUNT)).astype(np.float32)
    signal = features[:, :, 0] + 0.5 * features[:, :, 9] + rng.normal(0, 0.3, (queries, width))
    gains = np.clip(np.round(signal), 0, 2).astype(np.float32)
    rows = np.tile(np.arange(width), (queries, 1)).astype(np.int64)
    rows[:, -3:] = -1  # padding never reaches the trees
    gains[:, -3:] = 0
    ideal = np.array([np.sum(np.sort(g)[::-1][:10] / np.log2(np.arange(2, 12))) for g in gains])
    return ExampleSet(
        [f"q{i}" for i in range(queries)], rows, features, features[:, :, 0], gains, ideal
    )


@pytest.fixture(scope="module")
def lambdamart():
    from ecomsearch.ranking.trees import LambdaMartSettings, train_lambdamart

    settings = LambdaMartSettings(max_rounds=60, min_data_in_leaf=20, early_stopping_rounds=10)
    train_set, early_set = synthetic_examples(200, 0), synthetic_examples(50, 1)
    return train_lambdamart(train_set, early_set, seed=3, settings=settings), early_set


def test_lambdamart_learns_the_features_that_carry_the_gain(lambdamart):
    from ecomsearch.ranking.training import ndcg_at_10

    (scorer, report), early_set = lambdamart
    assert 1 <= report.best_round <= report.rounds_run <= 60
    learned = ndcg_at_10(scorer(early_set.features), early_set)
    shuffled = ndcg_at_10(np.random.default_rng(0).random(early_set.rows.shape), early_set)
    assert learned > shuffled + 0.2
    importance = scorer.booster.feature_importance("gain")
    assert set(np.argsort(importance)[-2:]) == {0, 9}


def test_tree_contributions_sum_to_the_score_and_follow_the_features(lambdamart):
    from ecomsearch.ranking.explain import TreeExplainer

    (scorer, _), early_set = lambdamart
    explainer = TreeExplainer(scorer.booster)
    features = early_set.features[0]
    contributions = explainer.contributions(features)
    assert contributions.shape == (len(features), FEATURE_COUNT + 1)
    np.testing.assert_allclose(
        contributions.sum(axis=1), scorer(features[None])[0], rtol=1e-5, atol=1e-5
    )
    changed = features.copy()
    changed[:, 0] += 3.0  # much more of the feature that matters most
    assert (explainer.contributions(changed)[:, 0] >= contributions[:, 0] - 1e-9).all()
    assert (explainer.contributions(changed)[:, 0] > contributions[:, 0]).any()


def test_the_tree_export_is_verified_against_lightgbm(lambdamart, tmp_path: Path) -> None:
    import onnxruntime as ort

    from ecomsearch.export.ranker import export_search_ranker

    (scorer, report), early_set = lambdamart
    layout = ModelRepositoryLayout(tmp_path)
    info = {
        **TRAINING_INFO,
        "kind": "lambdamart",
        "training": {"best_round": report.best_round, "rounds_run": report.rounds_run},
        "feature_sample": early_set.features[early_set.valid],
    }
    record = export_search_ranker(scorer, layout, info)

    assert "feature_sample" not in record
    assert record["max_abs_difference"] <= 1e-3
    assert layout.ranker_tree_model.is_file()
    graph = onnx.load(str(layout.ranker_onnx)).graph
    assert [i.name for i in graph.input] == [contract.CANDIDATE_FEATURES]
    assert [o.name for o in graph.output] == [contract.RANKING_SCORES]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == [
        "batch",
        "candidates",
    ]
    features = early_set.features[:5, :11]
    (served,) = ort.InferenceSession(str(layout.ranker_onnx)).run(
        None, {contract.CANDIDATE_FEATURES: features}
    )
    np.testing.assert_allclose(served, scorer(features), atol=1e-3)
    card = render_model_card({**record, "opset": OPSET})
    assert "LambdaMART" in card and f"{report.best_round} rounds" in card

    assert not layout.ranker_mlp_weights.exists()
    # An MLP exported over it leaves no stale tree model behind.
    export_search_ranker(tiny_ranker(), layout, info)
    assert not layout.ranker_tree_model.exists() and layout.ranker_mlp_weights.is_file()


def test_the_mlp_export_writes_weights_whose_deeplift_contributions_sum_to_the_score(
    tmp_path: Path,
) -> None:
    import onnxruntime as ort

    from ecomsearch.ranking.explain import MlpExplainer, load_explainer

    layout = ModelRepositoryLayout(tmp_path)
    model = tiny_ranker()
    export_search_ranker(model, layout, TRAINING_INFO)
    explainer = load_explainer(layout.ranker_tree_model, layout.ranker_mlp_weights)
    assert isinstance(explainer, MlpExplainer)

    features = np.random.default_rng(5).normal(size=(1, 40, FEATURE_COUNT)).astype(np.float32)
    (served,) = ort.InferenceSession(str(layout.ranker_onnx)).run(
        None, {contract.CANDIDATE_FEATURES: features}
    )
    contributions = explainer.contributions(features[0])
    np.testing.assert_allclose(contributions.sum(axis=1), served[0], atol=1e-4)
    # The base value is the score of the training mean, where every contribution is zero.
    mean = model.feature_mean.numpy()[None]
    at_mean = explainer.contributions(mean)
    np.testing.assert_allclose(at_mean[0, :-1], 0.0, atol=1e-12)
    (mean_score,) = ort.InferenceSession(str(layout.ranker_onnx)).run(
        None, {contract.CANDIDATE_FEATURES: mean[None].astype(np.float32)}
    )
    assert contributions[0, -1] == pytest.approx(float(mean_score[0, 0]), abs=1e-5)
    # Moving one feature moves its own contribution, and the sum still holds.
    changed = features[0].copy()
    changed[:, 3] += 2.0
    moved = explainer.contributions(changed)
    assert not np.allclose(moved[:, 3], contributions[:, 3])
    (served_changed,) = ort.InferenceSession(str(layout.ranker_onnx)).run(
        None, {contract.CANDIDATE_FEATURES: changed[None]}
    )
    np.testing.assert_allclose(moved.sum(axis=1), served_changed[0], atol=1e-4)


def test_the_teacher_labels_only_unjudged_candidates_within_its_depth():
    from ecomsearch.evaluation.metrics import Judgments
    from ecomsearch.ranking.training import ExampleSet, with_teacher_gains

    judgments = Judgments({"drill": {"p1": 3.0, "p2": 1.0}, "saw": {"p7": 2.0}}, 1.0, 3.0)
    rows = np.array([[10, 11, 12, 13], [14, 15, -1, -1]])
    titles = {
        10: ("p1", "Drill"),
        11: ("p2", "Bit"),
        12: ("u1", "Cordless drill"),
        13: ("u2", "Hammer"),
        14: ("u3", "Saw blade"),
        15: ("p7", "Hand saw"),
    }
    examples = ExampleSet(
        ["drill", "saw"],
        rows,
        np.zeros((2, 4, FEATURE_COUNT), np.float32),
        # retrieval order: drill 12 > 10 > 11 > 13, saw 14 > 15
        np.array([[0.8, 0.5, 0.9, 0.1], [0.7, 0.6, 0.0, 0.0]], np.float32),
        np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32),
        np.ones(2),
    )
    asked = []

    def teacher(queries, texts):
        asked.extend(zip(queries, texts, strict=True))
        return np.array([0.9 if "drill" in t.lower() else 0.2 for t in texts], np.float32)

    relabelled, pairs = with_teacher_gains(examples, judgments, titles, teacher, 3, 0.5)
    # Depth 3 of drill: 12 (unjudged), 10 and 11 (judged); 13 is beyond it. Saw: 14 only.
    assert sorted(asked) == [("drill", "Cordless drill"), ("saw", "Saw blade")] and pairs == 2
    np.testing.assert_allclose(
        relabelled.gains, [[2.0, 0.0, 0.5 * 2 * 0.9, 0.0], [0.5 * 2 * 0.2, 1.0, 0.0, 0.0]]
    )
    assert examples.gains[0, 2] == 0.0  # the original set is left alone
