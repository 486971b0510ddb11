"""The Python drop-in for the onnxruntime backend (ecomsearch/server/backends/onnxruntime/model.py),
serving the real query_encoder config over a tiny hand-built ONNX graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.errors import RequestError
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.serving import onnx_runtime
from ecomsearch.serving.onnx_runtime import check_input
from tests.project import MODEL_REPOSITORY, PROJECT_ROOT

BACKEND_MODEL = PROJECT_ROOT / "ecomsearch" / "server" / "backends" / "onnxruntime" / "model.py"
DIMENSION = 384  # the config's embedding dims
WEIGHTS = np.random.default_rng(0).normal(size=(2, DIMENSION)).astype(np.float32)


def write_tiny_encoder(
    path: Path,
    input_names: tuple[str, str] = (contract.INPUT_IDS, contract.ATTENTION_MASK),
    output_name: str = contract.EMBEDDING,
) -> None:
    """embedding = [sum(ids * mask), sum(mask)] @ WEIGHTS: computed per row from both inputs, so
    a row handed back to the wrong request, or a dropped mask, shows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ids, mask = input_names
    nodes = [
        helper.make_node("Mul", [ids, mask], ["masked"]),
        helper.make_node("Cast", ["masked"], ["masked_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [mask], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["masked_f", "axis1"], ["id_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["length"], keepdims=1),
        helper.make_node("Concat", ["id_sum", "length"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weights"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        inputs=[
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in input_names
        ],
        outputs=[
            helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", DIMENSION])
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(WEIGHTS, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def expected_embedding(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    features = np.stack(
        [(input_ids * attention_mask).sum(axis=1), attention_mask.sum(axis=1)], axis=1
    ).astype(np.float32)
    return features @ WEIGHTS


def tokens(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, 1000, size=(rows, length), dtype=np.int64)
    lengths = rng.integers(2, length + 1, size=rows)
    attention_mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
    return {contract.INPUT_IDS: input_ids * attention_mask, contract.ATTENTION_MASK: attention_mask}


class CountingSession:
    """Wraps the real InferenceSession and records the batch size of every run."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.batches: list[tuple[int, ...]] = []

    def run(self, output_names, feed):
        self.batches.append(feed[contract.INPUT_IDS].shape)
        return self._session.run(output_names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def served_file(model_dir: Path) -> Path:
    """The graph the drop-in loads: the config's default_model_filename (the int8 twin)."""
    return ModelRepositoryLayout(model_dir.parent).served_model_file(model_dir.name)


@pytest.fixture
def encoder_dir(tmp_path: Path, triton) -> Path:
    model_dir = triton.copy_model_dir(contract.ENCODER_MODEL, tmp_path)
    write_tiny_encoder(served_file(model_dir))
    return model_dir


@pytest.fixture
def encoder(triton, encoder_dir: Path):
    model = triton.initialize(BACKEND_MODEL, triton.args(encoder_dir / "config.pbtxt", encoder_dir))
    model.model.session = CountingSession(model.model.session)
    return model


def assert_embedding(triton, response, inputs: dict[str, np.ndarray]) -> None:
    out = triton.outputs(response)
    assert set(out) == {contract.EMBEDDING}
    embedding = out[contract.EMBEDDING]
    assert embedding.dtype == np.float32  # the config's TYPE_FP32
    assert embedding.shape == (len(inputs[contract.INPUT_IDS]), DIMENSION)
    np.testing.assert_allclose(embedding, expected_embedding(**inputs), rtol=1e-5)


def test_same_shape_requests_run_as_one_batch(triton, encoder) -> None:
    inputs = [tokens(2, 16, seed=1), tokens(1, 16, seed=2), tokens(3, 16, seed=3)]

    responses = encoder.execute([triton.request(**i) for i in inputs])

    assert encoder.model.session.batches == [(6, 16)]
    assert len(responses) == 3
    for response, request_inputs in zip(responses, inputs, strict=True):
        assert_embedding(triton, response, request_inputs)


def test_different_sequence_lengths_in_one_execute(triton, encoder) -> None:
    inputs = [
        tokens(2, 16, seed=4),
        tokens(1, 32, seed=5),
        tokens(1, 16, seed=6),
        tokens(2, 48, seed=7),
    ]

    responses = encoder.execute([triton.request(**i) for i in inputs])

    assert sorted(encoder.model.session.batches) == [(1, 32), (2, 48), (3, 16)]
    assert len(responses) == 4
    for response, request_inputs in zip(responses, inputs, strict=True):
        assert_embedding(triton, response, request_inputs)


def test_a_request_missing_an_input_gets_invalid_arg(triton, encoder) -> None:
    good_before, good_after = tokens(1, 16, seed=8), tokens(2, 16, seed=9)
    partial = {contract.INPUT_IDS: tokens(1, 16, seed=10)[contract.INPUT_IDS]}

    responses = encoder.execute(
        [triton.request(**good_before), triton.request(**partial), triton.request(**good_after)]
    )

    assert_embedding(triton, responses[0], good_before)
    triton.assert_invalid_arg(responses[1], "'attention_mask'", "required")
    assert_embedding(triton, responses[2], good_after)
    assert encoder.model.session.batches == [(3, 16)]


def test_config_thread_parameter_reaches_the_session(encoder) -> None:
    session = encoder.model.session
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config_path = MODEL_REPOSITORY / contract.ENCODER_MODEL / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    threads = int(config.parameters["intra_op_thread_count"].string_value)
    assert session.get_session_options().intra_op_num_threads == threads
    assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("graph_names", "fragment"),
    [
        pytest.param(
            {"input_names": ("ids", contract.ATTENTION_MASK)},
            "inputs ['attention_mask', 'ids']",
            id="input-renamed",
        ),
        pytest.param(
            {"output_name": "sentence_embedding"},
            "outputs ['sentence_embedding']",
            id="output-renamed",
        ),
    ],
)
def test_a_config_that_does_not_match_the_graph_fails_initialize(
    triton, encoder_dir: Path, graph_names: dict[str, Any], fragment: str
) -> None:
    write_tiny_encoder(served_file(encoder_dir), **graph_names)
    args = triton.args(encoder_dir / "config.pbtxt", encoder_dir)
    with pytest.raises(triton.pb_utils.TritonModelException, match="do not match") as raised:
        triton.initialize(BACKEND_MODEL, args)
    assert fragment in str(raised.value)


def test_a_missing_model_file_fails_initialize(triton, encoder_dir: Path) -> None:
    served_file(encoder_dir).unlink()
    args = triton.args(encoder_dir / "config.pbtxt", encoder_dir)
    with pytest.raises(triton.pb_utils.TritonModelException, match=r"model\.int8\.onnx not found"):
        triton.initialize(BACKEND_MODEL, args)


def test_gpu_instances_ask_for_their_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert onnx_runtime._providers("GPU", 1) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert onnx_runtime._providers("CPU", 1) == ["CPUExecutionProvider"]


def test_gpu_instances_fall_back_to_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_runtime._providers("GPU", 1) == ["CPUExecutionProvider"]


def test_a_request_whose_inputs_disagree_fails_alone(triton, encoder) -> None:
    same_shape, other_shape = tokens(1, 16, seed=11), tokens(2, 32, seed=12)
    mismatched = {
        contract.INPUT_IDS: np.ones((1, 16), np.int64),
        contract.ATTENTION_MASK: np.ones((1, 32), np.int64),
    }

    responses = encoder.execute(
        [triton.request(**same_shape), triton.request(**mismatched), triton.request(**other_shape)]
    )

    assert_embedding(triton, responses[0], same_shape)
    assert responses[1].has_error()
    assert_embedding(triton, responses[2], other_shape)


def _with(inputs: dict[str, np.ndarray], name: str, change) -> dict[str, np.ndarray]:
    changed = {key: value.copy() for key, value in inputs.items()}
    change(changed[name])
    return changed


BAD_TOKENS = {
    # ONNX Runtime would read -1 as the embedding table's last row: a wrong answer, not an error.
    "negative-token-id": (
        lambda t: _with(t, contract.INPUT_IDS, lambda ids: ids.__setitem__((0, 1), -1)),
        ["'input_ids'", "below 0"],
    ),
    "mask-not-0-or-1": (
        lambda t: _with(t, contract.ATTENTION_MASK, lambda mask: mask.__setitem__((0, 0), 7)),
        ["'attention_mask'", "above 1"],
    ),
    "sequence-too-long": (
        lambda t: tokens(1, contract.MAX_SEQUENCE_LENGTH + 1, seed=14),
        ["length", str(contract.MAX_SEQUENCE_LENGTH)],
    ),
    "empty-sequence": (
        lambda t: {name: np.zeros((1, 0), np.int64) for name in t},
        ["empty"],
    ),
}


@pytest.mark.parametrize("case", BAD_TOKENS)
def test_a_request_outside_the_input_limits_fails_alone_before_onnx_runtime(
    triton, encoder, case: str
) -> None:
    make_bad, fragments = BAD_TOKENS[case]
    good_before, good_after = tokens(1, 16, seed=16), tokens(2, 16, seed=17)

    responses = encoder.execute(
        [
            triton.request(**good_before),
            triton.request(**make_bad(tokens(1, 16, seed=18))),
            triton.request(**good_after),
        ]
    )

    assert_embedding(triton, responses[0], good_before)
    triton.assert_invalid_arg(responses[1], *fragments)
    assert_embedding(triton, responses[2], good_after)
    assert encoder.model.session.batches == [(3, 16)]  # the bad one never reached the session


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_inputs_must_be_finite(bad: float) -> None:
    features = np.zeros((1, 4, 17), np.float32)
    features[0, 2, 5] = bad
    with pytest.raises(RequestError, match="finite"):
        check_input(contract.CANDIDATE_FEATURES, features)


def test_candidate_count_is_limited() -> None:
    check_input(contract.CANDIDATE_FEATURES, np.zeros((1, contract.MAX_CANDIDATES, 17), np.float32))
    with pytest.raises(RequestError, match=str(contract.MAX_CANDIDATES)):
        check_input(
            contract.CANDIDATE_FEATURES, np.zeros((1, contract.MAX_CANDIDATES + 1, 17), np.float32)
        )
