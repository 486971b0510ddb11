"""Exporting the trained ranker to ONNX, verified against PyTorch like the encoder."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.export.checks import validate_onnx_export
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES

OPSET = 17
AXES = {0: "batch", 1: "candidates"}
TRACE_BATCH, TRACE_CANDIDATES = 2, 400
CHECK_BATCH, CHECK_CANDIDATES = 3, 57
ATOL = 1e-4


def sample_features(batch: int, candidates: int, model, seed: int) -> np.ndarray:
    """Features around the training distribution (the model's own standardisation buffers)."""
    rng = np.random.default_rng(seed)
    mean = model.feature_mean.numpy()
    std = model.feature_std.numpy()
    return (mean + std * rng.normal(size=(batch, candidates, FEATURE_COUNT))).astype(np.float32)


def export_ranker(model, layout: ModelRepositoryLayout, info: dict[str, Any]) -> float:
    """Writes ranker/1/model.onnx and ranker.json; returns the max |ONNX - PyTorch|."""
    import torch

    traced = sample_features(TRACE_BATCH, TRACE_CANDIDATES, model, seed=0)
    with tempfile.TemporaryDirectory(prefix="ecomsearch-ranker-") as scratch:
        scratch_onnx = Path(scratch) / "model.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.from_numpy(traced),),
                str(scratch_onnx),
                input_names=[contract.CANDIDATE_FEATURES],
                output_names=[contract.RANKING_SCORES],
                dynamic_axes={contract.CANDIDATE_FEATURES: AXES, contract.RANKING_SCORES: AXES},
                opset_version=OPSET,
                dynamo=False,
            )
        checked = {
            contract.CANDIDATE_FEATURES: sample_features(CHECK_BATCH, CHECK_CANDIDATES, model, 1)
        }
        differences = validate_onnx_export(
            model, scratch_onnx, checked, [contract.RANKING_SCORES], atol=ATOL
        )
        layout.ranker_onnx.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(scratch_onnx), layout.ranker_onnx)
    record = {
        **info,
        "feature_names": list(FEATURE_NAMES),
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "candidates": CHECK_CANDIDATES},
        "max_abs_difference": differences[contract.RANKING_SCORES],
    }
    layout.ranker_info.write_text(json.dumps(record, indent=2) + "\n")
    return differences[contract.RANKING_SCORES]
