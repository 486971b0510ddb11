"""Verification of ONNX exports against PyTorch, in the manner of optimum's validation.

Every export is run by ONNX Runtime on inputs whose batch size and sequence length differ from
the traced ones, and compared with PyTorch: output names, then shapes, then values within an
explicit tolerance. Any difference beyond tolerance raises; nothing is downgraded to a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ExportValidationError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model."""


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    atol: float,
) -> dict[str, float]:
    """Checks names, shapes and values; returns the max absolute difference per output."""
    if set(reference) != set(candidate):
        raise ExportValidationError(
            f"output names differ: PyTorch has {sorted(reference)}, ONNX has {sorted(candidate)}"
        )
    max_differences = {}
    for name, expected in reference.items():
        actual = candidate[name]
        if expected.shape != actual.shape:
            raise ExportValidationError(
                f"output {name!r}: shape {actual.shape} from ONNX Runtime, "
                f"{expected.shape} from PyTorch"
            )
        if not np.all(np.isfinite(actual)):
            raise ExportValidationError(f"output {name!r}: ONNX Runtime produced NaN or inf")
        difference = float(np.max(np.abs(expected.astype(np.float64) - actual), initial=0.0))
        max_differences[name] = difference
        log.info("output %r: max |onnx - torch| = %.3g (atol %.1g)", name, difference, atol)
        if difference > atol:
            raise ExportValidationError(
                f"output {name!r}: max absolute difference {difference:.3g} exceeds atol {atol:.1g}"
            )
    return max_differences


def validate_onnx_export(
    torch_module,
    onnx_path: Path,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    atol: float,
) -> dict[str, float]:
    """Runs `inputs` through PyTorch and ONNX Runtime and compares with `compare_outputs`."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    if graph_inputs != set(inputs):
        raise ExportValidationError(
            f"ONNX inputs {sorted(graph_inputs)} differ from expected {sorted(inputs)}"
        )
    onnx_values = session.run(None, dict(inputs))
    onnx_outputs = dict(zip([o.name for o in session.get_outputs()], onnx_values, strict=True))
    with torch.inference_mode():
        torch_values = torch_module(*(torch.from_numpy(v) for v in inputs.values()))
    if isinstance(torch_values, torch.Tensor):
        torch_values = (torch_values,)
    torch_outputs = {
        name: value.numpy() for name, value in zip(output_names, torch_values, strict=True)
    }
    return compare_outputs(torch_outputs, onnx_outputs, atol)


def validate_embedding_agreement(
    torch_module,
    onnx_path: Path,
    inputs: Mapping[str, np.ndarray],
    min_cosine: float,
) -> float:
    """For a quantized graph, where values legitimately move: every ONNX embedding must point
    the same way as PyTorch's (cosine >= min_cosine). Returns the smallest cosine."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_embeddings,) = session.run(None, dict(inputs))
    with torch.inference_mode():
        torch_embeddings = torch_module(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    if onnx_embeddings.shape != torch_embeddings.shape:
        raise ExportValidationError(
            f"shape {onnx_embeddings.shape} from ONNX Runtime, "
            f"{torch_embeddings.shape} from PyTorch"
        )
    norms = np.linalg.norm(onnx_embeddings, axis=1) * np.linalg.norm(torch_embeddings, axis=1)
    cosine = float(np.min(np.sum(onnx_embeddings * torch_embeddings, axis=1) / norms))
    log.info("quantized graph: min cosine to PyTorch = %.5f (required %.3f)", cosine, min_cosine)
    if not cosine >= min_cosine:
        raise ExportValidationError(
            f"quantized embeddings drift: min cosine {cosine:.4f} is below {min_cosine}"
        )
    return cosine
