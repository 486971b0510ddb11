"""Exporting the trained ranker to ONNX through the verified export path, like the encoder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.export.onnx import OPSET, OnnxSignature, install, verified_export
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.features import FEATURE_NAMES

CANDIDATE_AXES = {0: "batch", 1: "candidates"}
SIGNATURE = OnnxSignature(
    inputs={contract.CANDIDATE_FEATURES: CANDIDATE_AXES},
    outputs={contract.RANKING_SCORES: CANDIDATE_AXES},
)
TRACE_BATCH, TRACE_CANDIDATES = 2, 400
CHECK_BATCH, CHECK_CANDIDATES = 3, 57
ATOL = 1e-4


def sample_features(batch: int, candidates: int, model, seed: int) -> np.ndarray:
    """Features around the training distribution (the model's own standardisation buffers)."""
    rng = np.random.default_rng(seed)
    mean = model.feature_mean.numpy()
    std = model.feature_std.numpy()
    shape = (batch, candidates, len(mean))
    return (mean + std * rng.normal(size=shape)).astype(np.float32)


def export_ranker(model, layout: ModelRepositoryLayout, info: dict[str, Any]) -> dict[str, Any]:
    """Writes the search ranker's model.onnx and ranker.json (`info` plus what the export
    checked); returns that record. A `RankerExporter` for `ecomsearch.ranking.training`."""
    return export_scorer(model, layout.ranker_onnx, layout.ranker_info, info, FEATURE_NAMES)


def export_recommend_ranker(
    model, layout: ModelRepositoryLayout, info: dict[str, Any]
) -> dict[str, Any]:
    """The recommendation ranker's model.onnx and recommender.json, the same way."""
    from ecomsearch.recommend.candidates import FEATURE_NAMES as RECOMMEND_FEATURES

    return export_scorer(
        model,
        layout.recommend_ranker_onnx,
        layout.recommender_info,
        info,
        RECOMMEND_FEATURES,
    )


def export_scorer(
    model,
    onnx_path: Path,
    info_path: Path,
    info: dict[str, Any],
    feature_names: Sequence[str],
) -> dict[str, Any]:
    """Exports a candidate scorer (candidate_features -> ranking_scores), verified at other
    shapes than traced, to `onnx_path`, and writes `info` plus the export's checks to
    `info_path`; returns that record."""
    if model.feature_mean.shape[0] != len(feature_names):
        raise ValueError(
            f"the model takes {model.feature_mean.shape[0]} features, the names say "
            f"{len(feature_names)}"
        )
    traced = {contract.CANDIDATE_FEATURES: sample_features(TRACE_BATCH, TRACE_CANDIDATES, model, 0)}
    checked = {
        contract.CANDIDATE_FEATURES: sample_features(CHECK_BATCH, CHECK_CANDIDATES, model, 1)
    }
    with verified_export(model, SIGNATURE, traced, checked, atol=ATOL) as export:
        install(export.onnx_path, onnx_path)
    record = {
        **info,
        "feature_names": list(feature_names),
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "candidates": CHECK_CANDIDATES},
        "max_abs_difference": export.max_abs_differences[contract.RANKING_SCORES],
    }
    info_path.write_text(json.dumps(record, indent=2) + "\n")
    return record
