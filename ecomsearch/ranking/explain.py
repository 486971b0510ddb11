"""Why a product ranks where it does: each feature's contribution to its ranker score.

Either kind of ranker train-ranker ships is explained, from a file its export writes beside the
served `model.onnx`:

- trees (`model.txt`): LightGBM's TreeSHAP (`pred_contrib`), each feature's exact Shapley value
  for the ensemble; with the ensemble's expected score (the base value) they sum to the score.
- the MLP (`mlp.npz`, its weights): DeepLIFT with the Rescale rule (Shrikumar et al., ICML 2017)
  against the training mean. For a ReLU network every layer's change is its input's change
  times a per-unit multiplier, so the contributions sum exactly to f(x) - f(mean), and the base
  value is f(mean): the sum is the score, with no sampling or path integral to approximate.

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


class Explainer:
    """[m, F] features -> [m, F + 1]: each feature's contribution, then the base value; each
    row sums to the ranker's score of that candidate."""

    def contributions(self, features: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def _check_features(features: np.ndarray) -> None:
    if features.ndim != 2 or features.shape[1] != FEATURE_COUNT:
        raise ValueError(f"features must be [m, {FEATURE_COUNT}], got {features.shape}")


class MlpExplainer(Explainer):
    """DeepLIFT-Rescale contributions of the MLP ranker, from its weights (`mlp.npz`)."""

    def __init__(self, weights_path: Path) -> None:
        with np.load(weights_path) as saved:
            self.mean = saved["feature_mean"].astype(np.float64)
            self.std = saved["feature_std"].astype(np.float64)
            count = int(saved["layers"])
            self.layers = [
                (saved[f"weight_{i}"].astype(np.float64), saved[f"bias_{i}"].astype(np.float64))
                for i in range(count)
            ]
        if self.mean.shape != (FEATURE_COUNT,) or self.layers[0][0].shape[1] != FEATURE_COUNT:
            raise ExplainerError(f"{weights_path} is not a ranker over {FEATURE_COUNT} features")

    def contributions(self, features: np.ndarray) -> np.ndarray:
        _check_features(features)
        standardised = (features.astype(np.float64) - self.mean) / self.std
        # Forward pass for the inputs and for the reference (standardised 0), keeping each
        # hidden layer's multiplier: (relu(z) - relu(z0)) / (z - z0), or relu'(z) when z == z0.
        activation = standardised
        reference = np.zeros((1, FEATURE_COUNT))
        multipliers = []
        for weight, bias in self.layers[:-1]:
            z, z0 = activation @ weight.T + bias, reference @ weight.T + bias
            a, a0 = np.maximum(z, 0), np.maximum(z0, 0)
            delta = z - z0
            same = np.abs(delta) < 1e-12
            multipliers.append(
                np.where(same, (z > 0).astype(np.float64), (a - a0) / np.where(same, 1, delta))
            )
            activation, reference = a, a0
        weight, bias = self.layers[-1]
        base = float((reference @ weight.T + bias)[0, 0])
        # Backward: the output's multiplier with respect to each layer's input, chained.
        gradient = np.broadcast_to(weight[0], (len(features), weight.shape[1]))
        for (weight, _), multiplier in zip(
            reversed(self.layers[:-1]), reversed(multipliers), strict=True
        ):
            gradient = (gradient * multiplier) @ weight
        contributions = gradient * standardised
        return np.concatenate([contributions, np.full((len(features), 1), base)], axis=1)


class TreeExplainer(Explainer):
    """Exact per-feature contributions of a LightGBM ranker (TreeSHAP)."""

    def __init__(self, booster) -> None:
        if booster.num_feature() != FEATURE_COUNT:
            raise ExplainerError(
                f"the tree ranker takes {booster.num_feature()} features, not {FEATURE_COUNT}"
            )
        self.booster = booster

    @classmethod
    def from_file(cls, model_path: Path) -> TreeExplainer:
        """From the `model.txt` the tree export writes beside `model.onnx`."""
        import lightgbm

        return cls(lightgbm.Booster(model_file=str(model_path)))

    def contributions(self, features: np.ndarray) -> np.ndarray:
        _check_features(features)
        if not len(features):
            return np.zeros((0, FEATURE_COUNT + 1))
        return self.booster.predict(features.astype(np.float64), raw_score=True, pred_contrib=True)


def load_explainer(tree_model: Path, mlp_weights: Path) -> Explainer:
    """The explainer of the served ranker: its trees if it has them, else its MLP weights."""
    if tree_model.is_file():
        return TreeExplainer.from_file(tree_model)
    if mlp_weights.is_file():
        return MlpExplainer(mlp_weights)
    raise ExplainerError(
        f"neither {tree_model.name} nor {mlp_weights.name} is beside the served ranker in "
        f"{tree_model.parent}: it was exported before explanations; retrain it with "
        "`ecomsearch train-ranker`"
    )


def explanation(
    features: np.ndarray,
    contributions: np.ndarray,
    score: float,
    personal: float = 0.0,
    rerank: float = 0.0,
) -> dict:
    """One hit's explanation: its score, the ranker's base value, each feature's value and
    contribution (largest effect first), the personalisation term of a shopper's search and
    the cross-encoder's term of a reranked hit."""
    order = np.argsort(-np.abs(contributions[:FEATURE_COUNT]), kind="stable")
    record = {
        "score": round(float(score), DIGITS),
        "base_value": round(float(contributions[FEATURE_COUNT]), DIGITS),
        "contributions": {FEATURE_NAMES[i]: round(float(contributions[i]), DIGITS) for i in order},
        "feature_values": {FEATURE_NAMES[i]: round(float(features[i]), DIGITS) for i in order},
    }
    if personal:
        record["personalisation"] = round(float(personal), DIGITS)
    if rerank:
        record["rerank"] = round(float(rerank), DIGITS)
    return record


def explanations_json(
    features: np.ndarray,
    contributions: np.ndarray,
    scores: Sequence[float],
    personal: Sequence[float],
    rerank: Sequence[float] | None = None,
) -> list[bytes]:
    """UTF-8 JSON per hit, as the `explanations` output carries them."""
    return [
        json.dumps(
            explanation(
                features[i],
                contributions[i],
                scores[i],
                personal[i],
                0.0 if rerank is None else rerank[i],
            ),
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
        + record.get("rerank", 0.0)
    )
