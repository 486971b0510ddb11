"""Exporting the trained ranker to ONNX through the verified export path, like the encoder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.export.onnx import (
    OPSET,
    ExportValidationError,
    OnnxSignature,
    install,
    verified_export,
)
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


def export_search_ranker(
    model, layout: ModelRepositoryLayout, info: dict[str, Any]
) -> dict[str, Any]:
    """The `RankerExporter` of `ecomsearch.ranking.training`: trees (a TreeScorer) or the MLP
    (a torch module), each through its verified path."""
    from ecomsearch.ranking.trees import TreeScorer

    if isinstance(model, TreeScorer):
        return export_tree_ranker(model, layout, info)
    return export_ranker(model, layout, info)


def export_ranker(model, layout: ModelRepositoryLayout, info: dict[str, Any]) -> dict[str, Any]:
    """Writes the search ranker's model.onnx and ranker.json (`info` plus what the export
    checked); returns that record. An MLP leaves no tree model behind."""
    info = {k: v for k, v in info.items() if k != "feature_sample"}
    record = export_scorer(model, layout.ranker_onnx, layout.ranker_info, info, FEATURE_NAMES)
    save_mlp_weights(model, layout.ranker_mlp_weights)
    layout.ranker_tree_model.unlink(missing_ok=True)
    return record


def save_mlp_weights(model, path: Path) -> None:
    """The MLP's standardisation and linear layers as arrays, for the explainer; the weights
    are the ones just exported and verified."""
    import torch

    linears = [m for m in model.network if isinstance(m, torch.nn.Linear)]
    arrays = {
        "feature_mean": model.feature_mean.numpy(),
        "feature_std": model.feature_std.numpy(),
        "layers": np.array(len(linears)),
    }
    for i, linear in enumerate(linears):
        arrays[f"weight_{i}"] = linear.weight.detach().numpy()
        arrays[f"bias_{i}"] = linear.bias.detach().numpy()
    staging = path.with_name(f".{path.name}.writing")
    with staging.open("wb") as out:
        np.savez(out, **arrays)
    staging.replace(path)


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


# Trees compare float32 features with thresholds stored as float32 in ONNX (double in
# LightGBM): a feature within a rounding step of a threshold can take the other branch, so the
# check allows a small difference on a few candidates and reports the largest.
TREE_ATOL = 1e-3
TREE_FILE = "model.txt"
# onnxmltools converts LightGBM at opset 15 at most; the graph is then raised to OPSET.
CONVERTER_OPSET = 15  # LightGBM's own text model, beside the ONNX: `explain` reads it


def tree_to_onnx(booster, feature_count: int):
    """LightGBM booster -> ONNX graph with the ranker's signature: candidate_features
    [batch, candidates, F] -> ranking_scores [batch, candidates] (the converted ensemble runs
    on [batch * candidates, F], reshaped around it)."""
    import onnx
    import onnxmltools
    from onnx import TensorProto, helper
    from onnxmltools.convert.common.data_types import FloatTensorType

    flat = onnxmltools.convert_lightgbm(
        booster,
        initial_types=[("flat_features", FloatTensorType([None, feature_count]))],
        target_opset=CONVERTER_OPSET,
        zipmap=False,
    )
    graph = flat.graph
    (tree_output,) = [o.name for o in graph.output]
    del graph.input[:]
    del graph.output[:]
    graph.input.append(
        helper.make_tensor_value_info(
            contract.CANDIDATE_FEATURES, TensorProto.FLOAT, ["batch", "candidates", feature_count]
        )
    )
    graph.output.append(
        helper.make_tensor_value_info(
            contract.RANKING_SCORES, TensorProto.FLOAT, ["batch", "candidates"]
        )
    )
    graph.initializer.append(
        helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, feature_count])
    )
    graph.node.insert(
        0,
        helper.make_node("Reshape", [contract.CANDIDATE_FEATURES, "flat_shape"], ["flat_features"]),
    )
    graph.node.extend(
        [
            helper.make_node(
                "Shape", [contract.CANDIDATE_FEATURES], ["batch_candidates"], start=0, end=2
            ),
            helper.make_node(
                "Reshape", [tree_output, "batch_candidates"], [contract.RANKING_SCORES]
            ),
        ]
    )
    graph.name = "lambdamart_ranker"
    # Every exported graph shares OPSET; none of the ops here changed between the two.
    model = onnx.version_converter.convert_version(flat, OPSET)
    # The converter's shape hints ignore Shape's start/end (it records batch_candidates as 3
    # long); they are optional, and ONNX Runtime infers the right ones without them.
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def export_tree_ranker(
    scorer, layout: ModelRepositoryLayout, info: dict[str, Any]
) -> dict[str, Any]:
    """The search ranker as LightGBM trees: model.onnx, verified against LightGBM at shapes
    other than any training batch, plus model.txt (for explanations) and ranker.json."""
    import tempfile

    import onnx
    import onnxruntime as ort

    booster = scorer.booster
    feature_count = booster.num_feature()
    if feature_count != len(FEATURE_NAMES):
        raise ValueError(f"the trees take {feature_count} features, not {len(FEATURE_NAMES)}")
    model = tree_to_onnx(booster, feature_count)
    differences = []
    with tempfile.TemporaryDirectory(prefix="ecomsearch-export-") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        onnx.save(model, str(onnx_path))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        for batch, candidates, seed in ((CHECK_BATCH, CHECK_CANDIDATES, 1), (1, 400, 2)):
            features = info_features(info, batch, candidates, seed)
            (served,) = session.run(None, {contract.CANDIDATE_FEATURES: features})
            expected = scorer(features)
            if served.shape != expected.shape:
                raise ExportValidationError(
                    f"ranking_scores: shape {served.shape} from ONNX Runtime, "
                    f"{expected.shape} from LightGBM"
                )
            differences.append(float(np.max(np.abs(served - expected))))
        difference = max(differences)
        if not difference <= TREE_ATOL:
            raise ExportValidationError(
                f"ranking_scores: max absolute difference {difference:.3g} exceeds {TREE_ATOL}"
            )
        install(onnx_path, layout.ranker_onnx)
    booster.save_model(str(layout.ranker_tree_model))
    layout.ranker_mlp_weights.unlink(missing_ok=True)
    record = {
        **{k: v for k, v in info.items() if k != "feature_sample"},
        "feature_names": list(FEATURE_NAMES),
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "candidates": CHECK_CANDIDATES},
        "max_abs_difference": difference,
        "tree_model": layout.ranker_tree_model.name,
    }
    layout.ranker_info.write_text(json.dumps(record, indent=2) + "\n")
    return record


def info_features(info: dict[str, Any], batch: int, candidates: int, seed: int) -> np.ndarray:
    """Check inputs drawn from real candidates' features (info["feature_sample"], rows of the
    training set): trees split on the values real features take, which random normals miss."""
    sample = np.asarray(info["feature_sample"], dtype=np.float32)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(sample), size=batch * candidates)
    return sample[rows].reshape(batch, candidates, sample.shape[1])
