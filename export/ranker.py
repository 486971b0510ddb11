"""Exporting the trained ranker to ONNX through the verified export path, like the encoder."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.export.onnx import OPSET, OnnxSignature, install, verified_export
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES

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
    return (mean + std * rng.normal(size=(batch, candidates, FEATURE_COUNT))).astype(np.float32)


def export_ranker(model, layout: ModelRepositoryLayout, info: dict[str, Any]) -> dict[str, Any]:
    """Writes the ranker's model.onnx and ranker.json (`info` plus what the export checked);
    returns that record. A `RankerExporter` for `ecomsearch.ranking.training`."""
    traced = {contract.CANDIDATE_FEATURES: sample_features(TRACE_BATCH, TRACE_CANDIDATES, model, 0)}
    checked = {
        contract.CANDIDATE_FEATURES: sample_features(CHECK_BATCH, CHECK_CANDIDATES, model, 1)
    }
    with verified_export(model, SIGNATURE, traced, checked, atol=ATOL) as export:
        install(export.onnx_path, layout.ranker_onnx)
    record = {
        **info,
        "feature_names": list(FEATURE_NAMES),
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "candidates": CHECK_CANDIDATES},
        "max_abs_difference": export.max_abs_differences[contract.RANKING_SCORES],
    }
    layout.ranker_info.write_text(json.dumps(record, indent=2) + "\n")
    return record
