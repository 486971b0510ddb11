"""Why a product ranks where it does: each feature's contribution to its ranker score.

The shipped ranker is gradient-boosted trees, whose contributions are exact: LightGBM's
TreeSHAP (`pred_contrib`) gives each feature's Shapley value for the tree ensemble, and they
plus the ensemble's expected score (the base value) sum to the raw score. The explainer reads
the ranker's `model.txt`, written by the same export as the served `model.onnx`.

A personalised search adds the shopper's affinity after the ranker; it appears as its own term,
so an explanation always sums to the score the hit was returned with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES

DIGITS = 6


class ExplainerError(RuntimeError):
    """The served ranker cannot be explained (no tree model beside it, or another one)."""


class TreeExplainer:
    """Exact per-feature contributions of a LightGBM ranker (TreeSHAP)."""

    def __init__(self, model_path: Path) -> None:
        import lightgbm

        if not model_path.is_file():
            raise ExplainerError(
                f"{model_path} not found: the served ranker has no tree model to explain "
                "(an MLP ranker, or one trained before explanations); retrain with "
                "`ecomsearch train-ranker`"
            )
        self.booster = lightgbm.Booster(model_file=str(model_path))
        if self.booster.num_feature() != FEATURE_COUNT:
            raise ExplainerError(
                f"{model_path} takes {self.booster.num_feature()} features, not {FEATURE_COUNT}"
            )

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """[m, F] features -> [m, F + 1]: each feature's contribution, then the base value."""
        if features.ndim != 2 or features.shape[1] != FEATURE_COUNT:
            raise ValueError(f"features must be [m, {FEATURE_COUNT}], got {features.shape}")
        if not len(features):
            return np.zeros((0, FEATURE_COUNT + 1))
        return self.booster.predict(features.astype(np.float64), raw_score=True, pred_contrib=True)


def explanation(
    features: np.ndarray,
    contributions: np.ndarray,
    score: float,
    personal: float = 0.0,
) -> dict:
    """One hit's explanation: its score, the ranker's base value, each feature's value and
    contribution (largest effect first), and the personalisation term of a shopper's search."""
    order = np.argsort(-np.abs(contributions[:FEATURE_COUNT]), kind="stable")
    record = {
        "score": round(float(score), DIGITS),
        "base_value": round(float(contributions[FEATURE_COUNT]), DIGITS),
        "contributions": {FEATURE_NAMES[i]: round(float(contributions[i]), DIGITS) for i in order},
        "feature_values": {FEATURE_NAMES[i]: round(float(features[i]), DIGITS) for i in order},
    }
    if personal:
        record["personalisation"] = round(float(personal), DIGITS)
    return record


def explanations_json(
    features: np.ndarray,
    contributions: np.ndarray,
    scores: Sequence[float],
    personal: Sequence[float],
) -> list[bytes]:
    """UTF-8 JSON per hit, as the `explanations` output carries them."""
    return [
        json.dumps(
            explanation(features[i], contributions[i], scores[i], personal[i]),
            separators=(",", ":"),
        ).encode("utf-8")
        for i in range(len(features))
    ]


def explained_total(record: dict) -> float:
    """What an explanation adds up to: it equals the hit's score, up to rounding."""
    return (
        record["base_value"]
        + sum(record["contributions"].values())
        + record.get("personalisation", 0.0)
    )
