"""The ranker network (PyTorch; imported only for training and export)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HIDDEN_UNITS = (64, 32)


class Ranker(nn.Module):
    """[batch, candidates, features] -> [batch, candidates] scores; higher ranks first.

    Feature standardisation is part of the graph, so the served model takes raw features.
    """

    def __init__(self, feature_mean: np.ndarray, feature_std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.as_tensor(feature_mean, dtype=torch.float32))
        # A constant feature (std 0) must not divide by zero.
        std = np.where(feature_std > 1e-6, feature_std, 1.0)
        self.register_buffer("feature_std", torch.as_tensor(std, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = len(feature_mean)
        for units in HIDDEN_UNITS:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, 1))
        self.network = nn.Sequential(*layers)

    def forward(self, candidate_features: torch.Tensor) -> torch.Tensor:
        standardised = (candidate_features - self.feature_mean) / self.feature_std
        return self.network(standardised).squeeze(-1)


def listnet_loss(
    scores: torch.Tensor,
    gains: torch.Tensor,
    valid: torch.Tensor,
    relevant_gain: float | None = None,
    recall_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between the softmax of the scores and the exponential-gain distribution
    (ListNet's top-one form) over each query's real candidates; padding takes no part.

    With recall_weight > 0, a second ListNet term spreads the target evenly over every relevant
    candidate (gain >= relevant_gain), rewarding rankings that lift all of them, not only the
    best, into the first hundred.
    """
    loss = _listnet(scores, torch.exp2(gains) - 1.0, valid)
    if recall_weight > 0:
        if relevant_gain is None:
            raise ValueError("recall_weight needs relevant_gain")
        relevant = (gains >= relevant_gain).to(scores.dtype)
        loss = loss + recall_weight * _listnet(scores, relevant, valid)
    return loss


def _listnet(scores: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    target = torch.where(valid, weights, torch.zeros_like(weights))
    totals = target.sum(dim=1, keepdim=True)
    has_signal = totals.squeeze(1) > 0
    target = target / totals.clamp(min=1e-9)
    log_probs = torch.log_softmax(scores.masked_fill(~valid, -1e9), dim=1)
    per_query = -(target * log_probs).sum(dim=1)
    return per_query[has_signal].mean() if has_signal.any() else scores.sum() * 0.0
