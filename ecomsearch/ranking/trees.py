"""LambdaMART (LightGBM's lambdarank) on the ranker's features: the tree alternative to the
ListNet MLP, trained on the same candidates, split and labels.

Labels are the judgments' gains as whole numbers (gains in thirds of a grade become 0..6) with
a linear label gain, so LightGBM optimises the same linear-gain NDCG that `eval` reports.
Padding never reaches LightGBM: each query contributes only its real candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Gains are multiples of a third of a grade in mean-of-three-raters judgments; a finer step
# (quarters, from four raters) rounds to the nearest sixth, which NDCG barely notices.
LABEL_STEPS_PER_GAIN = 6


@dataclass(frozen=True)
class LambdaMartSettings:
    num_leaves: int = 31
    learning_rate: float = 0.05
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_rounds: int = 1000
    early_stopping_rounds: int = 50
    truncation_level: int = 20  # pairs are formed around the top of each list

    def params(self, seed: int, label_steps: int) -> dict:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "ndcg_eval_at": [10],
            "label_gain": list(range(label_steps + 1)),  # linear, as eval's NDCG
            "lambdarank_truncation_level": self.truncation_level,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": seed,
            "deterministic": True,
            "num_threads": 0,
            "verbosity": -1,
        }


@dataclass
class LambdaMartReport:
    best_round: int = 0
    rounds_run: int = 0
    best_early_stop_ndcg: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _flatten(examples, label_steps: int):
    """Real candidates only, query by query: (features [m, F], labels [m], group sizes)."""
    valid = examples.valid
    features = examples.features[valid]
    labels = np.rint(examples.gains[valid] * label_steps).astype(np.int32)
    return features, labels, valid.sum(axis=1)


class TreeScorer:
    """A trained booster as a candidate scorer: [n, width, F] -> [n, width] raw scores."""

    def __init__(self, booster) -> None:
        self.booster = booster

    def __call__(self, features: np.ndarray) -> np.ndarray:
        n, width, count = features.shape
        flat = features.reshape(n * width, count).astype(np.float64)
        return self.booster.predict(flat, raw_score=True).reshape(n, width).astype(np.float32)


def train_lambdamart(
    train_set, early_stop_set, seed: int, settings: LambdaMartSettings | None = None
) -> tuple[TreeScorer, LambdaMartReport]:
    """Early-stopped on NDCG@10 of the early-stopping queries (LightGBM's own, over their
    candidates); deterministic for a seed."""
    import lightgbm

    settings = settings or LambdaMartSettings()
    started = time.perf_counter()
    steps = LABEL_STEPS_PER_GAIN
    x, y, groups = _flatten(train_set, steps)
    ex, ey, egroups = _flatten(early_stop_set, steps)
    train_data = lightgbm.Dataset(x, y, group=groups, free_raw_data=False)
    early_data = lightgbm.Dataset(ex, ey, group=egroups, reference=train_data)
    evaluations: dict = {}
    booster = lightgbm.train(
        settings.params(seed, int(max(y.max(), ey.max(), steps * 2))),
        train_data,
        num_boost_round=settings.max_rounds,
        valid_sets=[early_data],
        valid_names=["early_stop"],
        callbacks=[
            lightgbm.early_stopping(settings.early_stopping_rounds, verbose=False),
            lightgbm.record_evaluation(evaluations),
        ],
    )
    curve = evaluations["early_stop"]["ndcg@10"]
    report = LambdaMartReport(
        best_round=int(booster.best_iteration),
        rounds_run=len(curve),
        best_early_stop_ndcg=float(max(curve)),
        seconds=time.perf_counter() - started,
        history=[
            {"round": i + 1, "ndcg_at_10": float(v)} for i, v in enumerate(curve) if i % 25 == 0
        ],
    )
    # Keep only the best rounds, so the export and predictions agree on the model.
    booster = lightgbm.Booster(
        model_str=booster.model_to_string(num_iteration=booster.best_iteration)
    )
    log.info(
        "LambdaMART: best round %d of %d, early-stop NDCG@10 %.4f, %.0f s",
        report.best_round,
        report.rounds_run,
        report.best_early_stop_ndcg,
        report.seconds,
    )
    return TreeScorer(booster), report
