"""Per-token int8 (ecomsearch.export.int8) on small graphs, against a numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecomsearch.export.int8 import (
    DEFAULT_SMOOTHING_ALPHA,
    DEFAULT_WEIGHT_BITS,
    channel_maxima,
    quantize_activation_rows,
    quantize_per_token,
    quantize_weight,
    smoothing_factors,
)


def two_layer_graph(weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """x -> (x @ wq, x @ wk) -> scores = q @ k^T (two activations, no constant) -> out = q @ wo."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("MatMul", ["q", "wo"], ["out"], name="output"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 16])],
        [
            helper.make_tensor_value_info(
                "scores", TensorProto.FLOAT, ["batch", "sequence", "sequence"]
            ),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 4]),
        ],
        [
            numpy_helper.from_array(value.astype(np.float32), name)
            for name, value in weights.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "wq": rng.normal(size=(16, 8)),
        "wk": rng.normal(size=(16, 8)),
        "wo": rng.normal(size=(8, 4)),
    }


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(["scores", "out"], session.run(["scores", "out"], {"x": x}), strict=True))


def reference_matmul(x: np.ndarray, weight: np.ndarray, bits: int) -> np.ndarray:
    x_u8, x_scale = quantize_activation_rows(x)
    w_q, w_scale = quantize_weight(weight, bits)
    product = (x_u8.astype(np.int32) - 128) @ w_q.astype(np.int32)
    return product.astype(np.float32) * x_scale * w_scale


@pytest.mark.parametrize("opset", [17, 18])
def test_the_graph_computes_what_the_numpy_reference_does(opset):
    weights = random_weights()
    x = np.random.default_rng(1).normal(size=(3, 5, 16)).astype(np.float32) * 4
    model = quantize_per_token(two_layer_graph(weights, opset)).model
    outputs = run(model, x)
    q = reference_matmul(x, weights["wq"], DEFAULT_WEIGHT_BITS)
    k = reference_matmul(x, weights["wk"], DEFAULT_WEIGHT_BITS)
    np.testing.assert_allclose(outputs["scores"], q @ k.transpose(0, 2, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        outputs["out"],
        reference_matmul(q, weights["wo"], DEFAULT_WEIGHT_BITS),
        rtol=1e-5,
        atol=1e-4,
    )


def test_it_stays_close_to_float32():
    weights = random_weights()
    x = np.random.default_rng(2).normal(size=(4, 6, 16)).astype(np.float32)
    exact = run(two_layer_graph(weights), x)["out"]
    quantized = run(quantize_per_token(two_layer_graph(weights)).model, x)["out"]
    error = np.abs(quantized - exact).max() / np.abs(exact).max()
    assert 0 < error < 0.05


def test_a_row_gets_the_same_result_alone_and_in_any_batch():
    model = quantize_per_token(two_layer_graph(random_weights())).model
    rng = np.random.default_rng(3)
    batch = rng.normal(size=(5, 4, 16)).astype(np.float32)
    # One row of huge values: a scale shared by the batch would crush the others to zero.
    batch[2] *= 1000
    together = run(model, batch)["out"]
    for row in range(len(batch)):
        alone = run(model, batch[row : row + 1])["out"][0]
        np.testing.assert_array_equal(alone, together[row])


def test_matmuls_sharing_an_input_share_its_quantization_and_activations_products_stay_float():
    quantized = quantize_per_token(two_layer_graph(random_weights()))
    ops = [node.op_type for node in quantized.model.graph.node]
    assert (quantized.matmuls, quantized.activations) == (3, 2)
    assert ops.count("MatMulInteger") == 3 and ops.count("ReduceMax") == 2
    assert ops.count("MatMul") == 1  # q @ k^T: two activations, nothing constant to quantize
    # Only standard operators: the graph runs on any ONNX Runtime, native backends included.
    assert {node.domain for node in quantized.model.graph.node} <= {""}
    # The float weights are gone, replaced by int8 ones.
    initializers = {tensor.name: tensor for tensor in quantized.model.graph.initializer}
    assert not {"wq", "wk", "wo"} & initializers.keys()
    assert sum(t.data_type == TensorProto.INT8 for t in initializers.values()) == 3


@pytest.mark.parametrize("bits", [7, 8])
def test_weights_stay_within_the_range_that_cannot_saturate(bits):
    weight = np.random.default_rng(4).normal(size=(32, 6)).astype(np.float32)
    weight[:, 5] = 0  # a dead column
    quantized, scales = quantize_weight(weight, bits)
    levels = 2 ** (bits - 1) - 1
    assert quantized.dtype == np.int8 and np.abs(quantized).max() == levels
    assert not quantized[:, 5].any() and scales[5] == 1.0
    np.testing.assert_allclose(quantized * scales, weight, atol=float(scales[:5].max()) / 2 + 1e-7)
    if bits == DEFAULT_WEIGHT_BITS:
        # u8 x s8 pair sums in int16 on CPUs without VNNI (vpmaddubsw): 255 * 63 * 2 < 32,767.
        assert 255 * levels * 2 < 2**15 - 1


def test_a_row_of_zeros_quantizes_to_the_zero_point_not_nan():
    values = np.zeros((2, 3, 8), np.float32)
    values[1, 1] = np.linspace(-2, 2, 8)
    quantized, scales = quantize_activation_rows(values)
    assert np.isfinite(scales).all()
    assert (
        (quantized[0] == 128).all() and quantized[1, 1].min() == 1 and quantized[1, 1].max() == 255
    )
    model = quantize_per_token(two_layer_graph(random_weights())).model
    x = np.zeros((1, 2, 16), np.float32)
    assert np.array_equal(run(model, x)["out"], np.zeros((1, 2, 4), np.float32))


def test_a_graph_without_a_constant_weight_is_refused():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "activations_only",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ValueError, match="no MatMul with a constant"):
        quantize_per_token(model)


def outlier_inputs(seed: int, batch: int = 4) -> np.ndarray:
    """Activations with two channels 60x the others, as after a transformer's LayerNorm."""
    x = np.random.default_rng(seed).normal(size=(batch, 6, 16)).astype(np.float32)
    x[..., [3, 11]] *= 60
    return x


def test_channel_maxima_are_the_calibration_inputs_largest_magnitudes():
    model = two_layer_graph(random_weights())
    feeds = [{"x": outlier_inputs(seed)} for seed in (5, 6)]
    maxima = channel_maxima(model, feeds)
    assert set(maxima) == {"x", "q"}  # the inputs of the three constant-weight MatMuls
    expected = np.abs(np.concatenate([f["x"] for f in feeds])).max(axis=(0, 1))
    np.testing.assert_allclose(maxima["x"], expected)


def test_smoothing_factors_follow_smoothquant_and_survive_dead_channels():
    activation_max = np.array([8.0, 1.0, 0.0], np.float32)
    weights = [np.array([[0.5, 2.0], [1.0, 1.0], [0.0, 0.0]], np.float32)]
    factors = smoothing_factors(activation_max, weights, 0.5)
    np.testing.assert_allclose(factors[:2], np.sqrt([8.0, 1.0]) / np.sqrt([2.0, 1.0]))
    assert np.isfinite(factors).all() and factors[2] > 0
    np.testing.assert_allclose(smoothing_factors(activation_max, weights, 0.0)[:2], [0.5, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(activation_max, weights, 1.5)


def test_smoothing_cuts_the_error_of_outlier_channels_and_keeps_the_float_product():
    weights = random_weights()
    model = two_layer_graph(weights)
    calibration = [{"x": outlier_inputs(seed)} for seed in (7, 8, 9)]
    x = outlier_inputs(10)
    exact = run(model, x)["out"]
    plain = quantize_per_token(model)
    smoothed = quantize_per_token(model, calibration=calibration)
    assert (plain.smoothed, smoothed.smoothed) == (0, 2)

    def error(quantized) -> float:
        return float(np.abs(run(quantized.model, x)["out"] - exact).max() / np.abs(exact).max())

    assert error(smoothed) < error(plain) / 2
    # What the graph computes: x divided by the factors channel by channel, the rows of the
    # weights reading it multiplied by them (query and key share x, so share its factors).
    factors = smoothing_factors(
        channel_maxima(model, calibration)["x"],
        [weights["wq"], weights["wk"]],
        DEFAULT_SMOOTHING_ALPHA,
    )
    x_u8, x_scale = quantize_activation_rows(x * (1 / factors))

    def smoothed_product(weight: np.ndarray) -> np.ndarray:
        w_q, w_scale = quantize_weight(weight * factors[:, None])
        product = (x_u8.astype(np.int32) - 128) @ w_q.astype(np.int32)
        return product.astype(np.float32) * x_scale * w_scale

    q, k = smoothed_product(weights["wq"]), smoothed_product(weights["wk"])
    np.testing.assert_allclose(
        run(smoothed.model, x)["scores"], q @ k.transpose(0, 2, 1), rtol=1e-4, atol=1e-2
    )


def test_a_smoothed_row_gets_the_same_result_alone_and_in_any_batch():
    model = two_layer_graph(random_weights())
    smoothed = quantize_per_token(model, calibration=[{"x": outlier_inputs(11)}]).model
    batch = outlier_inputs(12, batch=5)
    together = run(smoothed, batch)["out"]
    for row in range(len(batch)):
        np.testing.assert_array_equal(run(smoothed, batch[row : row + 1])["out"][0], together[row])
