"""PyTorch to ONNX, verified in the manner of optimum's validation: the one export path that the
encoder and the ranker both take.

A module is traced at one shape into a scratch directory, then ONNX Runtime runs it on inputs
whose batch size and second axis differ from the traced ones and is compared with PyTorch:
output names, then shapes, then values within an explicit tolerance. Any difference beyond
tolerance raises; nothing is downgraded to a warning. Only a verified graph is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch.encoder import row_cosines

log = logging.getLogger(__name__)

# The ONNX opset of every exported graph; ONNX Runtime 1.17+ and Triton 24.x run it.
OPSET = 17


class ExportValidationError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class OnnxSignature:
    """A graph's tensors, in order, each with its axes beyond the fixed ones: a name makes an
    axis dynamic (`{0: "batch", 1: "sequence"}`), a number declares a fixed width that the
    tracer would leave symbolic (`{1: 384}`)."""

    inputs: Mapping[str, Mapping[int, str | int]]
    outputs: Mapping[str, Mapping[int, str | int]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            name: {axis: label for axis, label in axes.items() if isinstance(label, str)}
            for name, axes in {**self.inputs, **self.outputs}.items()
        }

    def fixed_output_widths(self) -> dict[str, dict[int, int]]:
        return {
            name: {axis: width for axis, width in axes.items() if isinstance(width, int)}
            for name, axes in self.outputs.items()
        }


@dataclass(frozen=True)
class VerifiedExport:
    onnx_path: Path  # in a scratch directory until installed
    max_abs_differences: dict[str, float]
    checked_shapes: dict[str, tuple[int, ...]]


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


def _run_both(torch_module, onnx_path: Path, inputs: Mapping[str, np.ndarray]):
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
    return onnx_outputs, [value.numpy() for value in torch_values]


def validate_onnx_export(
    torch_module,
    onnx_path: Path,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    atol: float,
) -> dict[str, float]:
    """Runs `inputs` through PyTorch and ONNX Runtime and compares with `compare_outputs`."""
    onnx_outputs, torch_values = _run_both(torch_module, onnx_path, inputs)
    torch_outputs = dict(zip(output_names, torch_values, strict=True))
    return compare_outputs(torch_outputs, onnx_outputs, atol)


def validate_embedding_agreement(
    torch_module,
    onnx_path: Path,
    inputs: Mapping[str, np.ndarray],
    min_cosine: float,
) -> float:
    """For a quantized graph, where values legitimately move: every ONNX embedding must point
    the same way as PyTorch's (cosine >= min_cosine). Returns the smallest cosine."""
    onnx_outputs, (torch_embeddings,) = _run_both(torch_module, onnx_path, inputs)
    (onnx_embeddings,) = onnx_outputs.values()
    if onnx_embeddings.shape != torch_embeddings.shape:
        raise ExportValidationError(
            f"shape {onnx_embeddings.shape} from ONNX Runtime, "
            f"{torch_embeddings.shape} from PyTorch"
        )
    cosine = float(np.min(row_cosines(onnx_embeddings, torch_embeddings)))
    log.info("quantized graph: min cosine to PyTorch = %.5f (required %.3f)", cosine, min_cosine)
    if not cosine >= min_cosine:
        raise ExportValidationError(
            f"quantized embeddings drift: min cosine {cosine:.4f} is below {min_cosine}"
        )
    return cosine


def _declare_fixed_widths(onnx_path: Path, widths: Mapping[str, Mapping[int, int]]) -> None:
    import onnx

    if not any(widths.values()):
        return
    model = onnx.load(str(onnx_path))
    for output in model.graph.output:
        for axis, width in widths.get(output.name, {}).items():
            dim = output.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = width
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


@contextmanager
def verified_export(
    torch_module,
    signature: OnnxSignature,
    traced: Mapping[str, np.ndarray],
    checked: Mapping[str, np.ndarray],
    atol: float,
) -> Iterator[VerifiedExport]:
    """Exports `torch_module` traced on `traced`, then verifies it on `checked` (other shapes);
    yields the graph in a scratch directory that is removed on exit: `install` it first."""
    import torch

    for name, value in traced.items():
        if value.shape == checked[name].shape:
            raise ValueError(f"{name}: check at a shape other than the traced {value.shape}")
    with tempfile.TemporaryDirectory(prefix="ecomsearch-export-") as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        # The tracer warns about Python branches on shapes inside transformers; the validation
        # at other shapes below is what proves the graph general.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*aten::index.*")
            # The TorchScript exporter is deprecated in favour of torch.export; it is kept while
            # it is the one that names dynamic axes the way Triton configs and optimum do.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                torch_module,
                tuple(torch.from_numpy(v) for v in traced.values()),
                str(onnx_path),
                input_names=list(signature.inputs),
                output_names=list(signature.outputs),
                dynamic_axes=signature.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
        _declare_fixed_widths(onnx_path, signature.fixed_output_widths())
        differences = validate_onnx_export(
            torch_module, onnx_path, checked, list(signature.outputs), atol
        )
        yield VerifiedExport(
            onnx_path, differences, {name: value.shape for name, value in checked.items()}
        )


def install(source: Path, target: Path) -> None:
    """Puts a file in place in one atomic rename (copied beside the target first, so the rename
    never crosses file systems): a reader sees the old file or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.installing-{os.getpid()}")
    shutil.copy2(source, staging)
    os.replace(staging, target)
