"""Per-token int8 for a float32 transformer graph, in standard ONNX operators.

Every `MatMul` whose second input is a constant 2-D weight becomes an integer product:

- the weight is quantized once, at export, one symmetric scale per output column;
- the activation is quantized when the graph runs, one symmetric scale per row (per token),
  so a query's embedding never depends on the queries Triton batched it with. ONNX Runtime's
  dynamic quantization uses one scale for the whole batch, which moved the top 10 of 84% of
  the demo's queries between alone and batched (docs/performance.md);
- `MatMulInteger` multiplies them and the product is scaled back to float by the two scales.

MatMuls sharing an input (query, key and value) share its quantization. Only operators of the
ONNX standard are used (opset 10 `MatMulInteger` and elementwise ones), so the graph runs on any
ONNX Runtime, including the older native backend of the NGC Triton images, unlike ONNX Runtime's
contrib `MatMulNBits`, which the previous int8 encoder needed (1.22 or later).

Why 7-bit weights by default: the activations are unsigned 8-bit around a zero point of 128
(`MatMulInteger`'s u8 x s8 form, the fast one on x86). CPUs without AVX-512 VNNI multiply it with
`vpmaddubsw`, whose pairwise int16 sums saturate when 255 x 127 x 2 > 32,767; weights within
[-63, 63] keep every pair below it (255 x 63 x 2 = 32,130), so the result is the same on any
x86 CPU, at a measured cost of 0.0009 in the worst cosine to float32 against 8-bit weights.

Smoothing (SmoothQuant, Xiao et al. 2023), when calibration inputs are given: a few channels of a
transformer's activations (after its LayerNorms above all) are far larger than the rest, so one
scale per token leaves the others few levels. Each quantized activation is divided channel by
channel by s = max|x_j|^alpha / max|w_j|^(1 - alpha) and the weight rows multiplied by it, which
leaves the float product unchanged and moves part of the range into the weights. The channel
maxima come from running the float graph on the calibration inputs; random token ids serve
(the outlier channels are the model's, not the text's): on the demo's queries the worst cosine
to float32 rose from 0.9959 to 0.9974 with them, as with real queries for calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# 255 x 63 x 2 < 2**15 - 1: no saturation in u8 x s8 pair sums on CPUs without VNNI.
DEFAULT_WEIGHT_BITS = 7
ACTIVATION_ZERO_POINT = 128  # u8 activations: symmetric int8 shifted to unsigned
ACTIVATION_LEVELS = 127  # |round(x / scale)| <= 127, so x_q lies in [1, 255]
# A row of zeros would get a zero scale and divide by it; any positive floor gives it zeros.
MIN_ACTIVATION_SCALE = 1e-12
# SmoothQuant's migration strength: 0 leaves activations alone, 1 moves their whole range into
# the weights. 0.5 measured best here with 7-bit weights (0.3: worst cosine 0.9969, 0.7: 0.9975).
DEFAULT_SMOOTHING_ALPHA = 0.5
# Floor of both channel maxima in the smoothing factor: a dead channel must not give 0 or inf.
MIN_CHANNEL_MAX = 1e-5
PREFIX = "int8"


@dataclass(frozen=True)
class QuantizedGraph:
    model: onnx.ModelProto
    matmuls: int  # MatMuls made integer
    activations: int  # distinct activations quantized (shared by MatMuls with one input)
    smoothed: int  # of those, divided channel by channel before quantization


def quantize_weight(
    weight: np.ndarray, bits: int = DEFAULT_WEIGHT_BITS
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8: returns (int8 [K, N], float32 scales [N]). A column of zeros
    gets scale 1 and stays zeros."""
    if weight.ndim != 2:
        raise ValueError(f"a weight must be 2-D, got shape {weight.shape}")
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be within 2..8, got {bits}")
    levels = 2 ** (bits - 1) - 1
    weight = weight.astype(np.float32)
    scales = np.abs(weight).max(axis=0) / levels
    scales[scales == 0] = 1.0
    quantized = np.clip(np.rint(weight / scales), -levels, levels).astype(np.int8)
    return quantized, scales.astype(np.float32)


def quantize_activation_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the graph computes for an activation, in numpy (the tests' reference): u8 values
    around ACTIVATION_ZERO_POINT and one float32 scale per row (last axis reduced)."""
    values = values.astype(np.float32)
    scales = np.maximum(
        np.abs(values).max(axis=-1, keepdims=True) * np.float32(1 / ACTIVATION_LEVELS),
        np.float32(MIN_ACTIVATION_SCALE),
    )
    quantized = (np.rint(values / scales) + ACTIVATION_ZERO_POINT).astype(np.uint8)
    return quantized, scales


def smoothing_factors(
    activation_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float
) -> np.ndarray:
    """Per input channel: max|x_j|^alpha / max|w_j|^(1 - alpha), over every weight [K, N]
    that reads the activation; float32 [K]."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must be within 0..1, got {alpha}")
    weight_max = np.max([np.abs(weight).max(axis=1) for weight in weights], axis=0)
    factors = np.power(np.maximum(activation_max, MIN_CHANNEL_MAX), alpha) / np.power(
        np.maximum(weight_max, MIN_CHANNEL_MAX), 1 - alpha
    )
    return factors.astype(np.float32)


def quantized_activations(model: onnx.ModelProto) -> list[str]:
    """The names of the activations per_token quantization reads: the first inputs of the
    MatMuls on constant 2-D weights, in graph order."""
    weights = _constant_weights(model.graph)
    names: dict[str, None] = {}
    for node in model.graph.node:
        if _reads_constant_weight(node, weights):
            names[node.input[0]] = None
    return list(names)


def channel_maxima(
    model: onnx.ModelProto, calibration: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """max |value| of each channel (last axis) of every quantized activation, over all the
    calibration feeds, from the float graph run by ONNX Runtime."""
    import onnxruntime as ort

    names = quantized_activations(model)
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    declared = {output.name for output in probe.graph.output}
    for name in names:
        if name not in declared:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    maxima: dict[str, np.ndarray] = {}
    for feed in calibration:
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
    if not maxima:
        raise ValueError("no calibration input: give at least one feed")
    return maxima


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ValueError("the model imports no default-domain opset")


def _constant_weights(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {
        tensor.name: tensor
        for tensor in graph.initializer
        if len(tensor.dims) == 2 and tensor.data_type == TensorProto.FLOAT
    }


def _reads_constant_weight(node: onnx.NodeProto, weights: Mapping[str, onnx.TensorProto]) -> bool:
    """A MatMul this module makes integer: its second input is a constant 2-D float weight."""
    return node.op_type == "MatMul" and node.input[1] in weights


def quantize_per_token(
    model: onnx.ModelProto,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    smoothing_alpha: float = DEFAULT_SMOOTHING_ALPHA,
) -> QuantizedGraph:
    """A copy of `model` with every constant-weight MatMul made per-token int8 (see the module
    docstring), smoothed when `calibration` feeds are given. Raises ValueError when there is
    no MatMul to quantize."""
    opset = _default_opset(model)
    if opset < 13:
        raise ValueError(f"opset {opset}: per-token int8 needs opset 13 or later")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    weights = _constant_weights(graph)
    constants: list[onnx.TensorProto] = []

    def constant(name: str, value: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(value, name))
        return name

    inverse_levels = constant(
        f"{PREFIX}/inverse_levels", np.array(1 / ACTIVATION_LEVELS, np.float32)
    )
    min_scale = constant(f"{PREFIX}/min_scale", np.array(MIN_ACTIVATION_SCALE, np.float32))
    zero_point_f = constant(
        f"{PREFIX}/zero_point_float", np.array(ACTIVATION_ZERO_POINT, np.float32)
    )
    zero_point = constant(f"{PREFIX}/zero_point", np.array(ACTIVATION_ZERO_POINT, np.uint8))
    last_axis = constant(f"{PREFIX}/last_axis", np.array([-1], np.int64))

    quantized_inputs: dict[str, tuple[str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    matmuls = 0

    # One factor per channel of each activation, shared by every MatMul reading it.
    smoothing: dict[str, np.ndarray] = {}
    if calibration is not None:
        readers: dict[str, list[np.ndarray]] = {}
        for node in graph.node:
            if _reads_constant_weight(node, weights):
                readers.setdefault(node.input[0], []).append(
                    numpy_helper.to_array(weights[node.input[1]])
                )
        maxima = channel_maxima(model, calibration)
        smoothing = {
            name: smoothing_factors(maxima[name], readers[name], smoothing_alpha)
            for name in readers
        }

    def quantize_input(name: str) -> tuple[list[onnx.NodeProto], str, str]:
        """The nodes quantizing activation `name`, its u8 tensor and its per-row scales."""
        stem = f"{PREFIX}/activation{len(quantized_inputs)}"
        names = {
            part: f"{stem}/{part}"
            for part in ("abs", "max", "raw_scale", "scale", "scaled", "rounded", "shifted", "u8")
        }
        smoothed: list[onnx.NodeProto] = []
        if name in smoothing:
            inverse = constant(f"{stem}/inverse_smoothing", 1 / smoothing[name])
            smoothed = [helper.make_node("Mul", [name, inverse], [f"{stem}/smoothed"])]
            name = f"{stem}/smoothed"
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
            reduce = helper.make_node(
                "ReduceMax", [names["abs"], last_axis], [names["max"]], keepdims=1
            )
        else:
            reduce = helper.make_node(
                "ReduceMax", [names["abs"]], [names["max"]], axes=[-1], keepdims=1
            )
        quantization = [
            helper.make_node("Abs", [name], [names["abs"]]),
            reduce,
            helper.make_node("Mul", [names["max"], inverse_levels], [names["raw_scale"]]),
            helper.make_node("Max", [names["raw_scale"], min_scale], [names["scale"]]),
            helper.make_node("Div", [name, names["scale"]], [names["scaled"]]),
            # Round is half to even, as numpy's rint; |scaled| <= 127, so the Cast never wraps.
            helper.make_node("Round", [names["scaled"]], [names["rounded"]]),
            helper.make_node("Add", [names["rounded"], zero_point_f], [names["shifted"]]),
            helper.make_node("Cast", [names["shifted"]], [names["u8"]], to=TensorProto.UINT8),
        ]
        return smoothed + quantization, names["u8"], names["scale"]

    for node in graph.node:
        if not _reads_constant_weight(node, weights):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        if node.input[0] in smoothing:  # rows scaled up as the activation's channels are down
            weight = weight * smoothing[node.input[0]][:, None]
        weight_q, weight_scales = quantize_weight(weight, weight_bits)
        stem = f"{PREFIX}/matmul{matmuls}"
        matmuls += 1
        if node.input[0] not in quantized_inputs:
            added, activation_u8, activation_scale = quantize_input(node.input[0])
            nodes.extend(added)
            quantized_inputs[node.input[0]] = (activation_u8, activation_scale)
        activation_u8, activation_scale = quantized_inputs[node.input[0]]
        product, as_float, row_scaled = f"{stem}/int32", f"{stem}/float", f"{stem}/row_scaled"
        nodes += [
            helper.make_node(
                "MatMulInteger",
                [activation_u8, constant(f"{stem}/weight", weight_q), zero_point],
                [product],
                name=f"{node.name}/int8" if node.name else "",
            ),
            helper.make_node("Cast", [product], [as_float], to=TensorProto.FLOAT),
            helper.make_node("Mul", [as_float, activation_scale], [row_scaled]),
            helper.make_node(
                "Mul",
                [row_scaled, constant(f"{stem}/weight_scale", weight_scales)],
                list(node.output),
            ),
        ]
    if not matmuls:
        raise ValueError("the graph has no MatMul with a constant 2-D float weight to quantize")

    used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [tensor for tensor in constants if tensor.name in used])
    onnx.checker.check_model(model)
    return QuantizedGraph(
        model=model,
        matmuls=matmuls,
        activations=len(quantized_inputs),
        smoothed=len(smoothing),
    )


__all__ = [
    "DEFAULT_SMOOTHING_ALPHA",
    "DEFAULT_WEIGHT_BITS",
    "QuantizedGraph",
    "channel_maxima",
    "quantize_activation_rows",
    "quantize_per_token",
    "quantize_weight",
    "quantized_activations",
    "smoothing_factors",
]
