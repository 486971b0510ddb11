"""The encoder export and its verification, on a tiny randomly initialised BERT checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from ecomsearch import cli, contract
from ecomsearch.export import encoder as encoder_export
from ecomsearch.export.onnx import ExportValidationError, compare_outputs, validate_onnx_export
from ecomsearch.paths import ModelRepositoryLayout
from tests.unit.conftest import VOCAB as TINY_VOCAB


def test_compare_outputs_accepts_within_tolerance():
    reference = {"embedding": np.ones((2, 3), np.float32)}
    differences = compare_outputs(
        reference, {"embedding": reference["embedding"] + 1e-6}, atol=1e-4
    )
    assert 0 < differences["embedding"] < 1e-4


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"other": np.ones((2, 3), np.float32)}, "output names differ"),
        ({"embedding": np.ones((3, 2), np.float32)}, "shape"),
        ({"embedding": np.full((2, 3), np.nan, np.float32)}, "NaN"),
        ({"embedding": np.ones((2, 3), np.float32) * 1.01}, "exceeds atol"),
    ],
)
def test_compare_outputs_fails_loudly(candidate, message):
    with pytest.raises(ExportValidationError, match=message):
        compare_outputs({"embedding": np.ones((2, 3), np.float32)}, candidate, atol=1e-4)


def test_export_writes_a_verified_tokenizer_free_graph(tiny_checkpoint, tmp_path):
    layout = ModelRepositoryLayout(tmp_path)
    result = encoder_export.export_encoder(tiny_checkpoint, layout)

    assert result.dimension == 32
    assert result.max_abs_difference <= encoder_export.ATOL
    graph = onnx.load(str(layout.encoder_onnx)).graph
    assert [i.name for i in graph.input] == [contract.INPUT_IDS, contract.ATTENTION_MASK]
    assert [o.name for o in graph.output] == [contract.EMBEDDING]
    input_axes = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert input_axes == ["batch", "sequence"]
    output_dims = graph.output[0].type.tensor_type.shape.dim
    assert (output_dims[0].dim_param, output_dims[1].dim_value) == ("batch", 32)
    assert not any(node.op_type.startswith("Tokenizer") for node in graph.node)
    info = json.loads(layout.encoder_info.read_text())
    assert info["fingerprint"] == result.fingerprint
    assert info["validated_at"] != {"batch": encoder_export.TRACE_BATCH}
    assert (layout.tokenizer_dir / "tokenizer.json").is_file()


def test_exported_graph_is_unit_norm_and_ignores_padding(tiny_checkpoint, tmp_path):
    import onnxruntime as ort

    layout = ModelRepositoryLayout(tmp_path)
    encoder_export.export_encoder(tiny_checkpoint, layout)
    session = ort.InferenceSession(str(layout.encoder_onnx))
    ids = np.array([[2, 10, 11, 3]], dtype=np.int64)
    padded_ids = np.array([[2, 10, 11, 3, 0, 0, 0]], dtype=np.int64)
    (plain,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    mask = (padded_ids != 0).astype(np.int64)
    (padded,) = session.run(None, {"input_ids": padded_ids, "attention_mask": mask})
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(plain, padded, atol=1e-5)


def test_validation_rejects_a_graph_that_differs_from_pytorch(tiny_checkpoint, tmp_path):
    import torch

    layout = ModelRepositoryLayout(tmp_path)
    encoder_export.export_encoder(tiny_checkpoint, layout)
    module = encoder_export.build_sentence_encoder(tiny_checkpoint)
    with torch.no_grad():
        module.transformer.embeddings.word_embeddings.weight.mul_(1.5)
    inputs = encoder_export.sample_inputs(3, 21, len(TINY_VOCAB), seed=1)
    with pytest.raises(ExportValidationError, match="exceeds atol"):
        validate_onnx_export(module, layout.encoder_onnx, inputs, [contract.EMBEDDING], 1e-4)


def test_cli_exits_non_zero_when_verification_fails(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(encoder_export, "ATOL", -1.0)  # no difference can be within this
    argv = ["export-encoder", "--checkpoint", str(tiny_checkpoint)]
    assert cli.main([*argv, "--model-repository", str(tmp_path)]) == 1
    assert not ModelRepositoryLayout(tmp_path).encoder_onnx.exists()


def write_embedding_graph(path, batch_dependent: bool) -> None:
    """embedding = float(input_ids * attention_mask), minus the batch's mean row when
    `batch_dependent` (what per-batch activation scales amount to)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", [contract.INPUT_IDS, contract.ATTENTION_MASK], ["masked"]),
        helper.make_node("Cast", ["masked"], ["values"], to=TensorProto.FLOAT),
    ]
    if batch_dependent:
        nodes += [
            helper.make_node("ReduceMean", ["values"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["values", "mean"], [contract.EMBEDDING]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["values"], [contract.EMBEDDING]))
    tokens = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in (contract.INPUT_IDS, contract.ATTENTION_MASK)
    ]
    output = helper.make_tensor_value_info(contract.EMBEDDING, TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "embedding", tokens, [output]),
        opset_imports=[helper.make_opsetid("", 13)],
        ir_version=8,
    )
    onnx.save(model, str(path))


def test_row_cosines_pairs_rows_and_scores_zero_rows_by_equality():
    from ecomsearch.encoder import row_cosines

    a = np.array([[1, 0], [3, 4], [0, 0], [0, 0], [1, 1]], dtype=np.float32)
    b = np.array([[0, 1], [6, 8], [0, 0], [1, 0], [-2, -2]], dtype=np.float32)
    np.testing.assert_allclose(row_cosines(a, b), [0.0, 1.0, 1.0, 0.0, -1.0], atol=1e-6)


def test_a_graph_whose_rows_depend_on_their_batch_is_refused(tmp_path):
    inputs = encoder_export.sample_inputs(4, 9, vocab_size=5000, seed=3)
    independent, dependent = tmp_path / "independent.onnx", tmp_path / "dependent.onnx"
    write_embedding_graph(independent, batch_dependent=False)
    write_embedding_graph(dependent, batch_dependent=True)
    assert encoder_export.validate_rows_independent(independent, inputs) == pytest.approx(1.0)
    with pytest.raises(ExportValidationError, match="depends on the other rows"):
        encoder_export.validate_rows_independent(dependent, inputs)


def test_export_writes_the_int8_twin_verified_and_recorded(tiny_checkpoint, tmp_path):
    layout = ModelRepositoryLayout(tmp_path / "repository")
    result = encoder_export.export_encoder(tiny_checkpoint, layout)
    assert result.int8_onnx_path == layout.encoder_int8_onnx and layout.encoder_int8_onnx.is_file()
    info = json.loads(layout.encoder_info.read_text())["int8"]
    assert info["min_cosine_to_pytorch"] >= encoder_export.INT8_MIN_COSINE
    assert info["min_cosine_alone_to_batched"] >= encoder_export.ROW_INDEPENDENCE_MIN_COSINE
    graph = onnx.load(str(layout.encoder_int8_onnx)).graph
    ops = {node.op_type for node in graph.node}
    # Per-token int8 in standard operators only (export/int8.py): no float MatMul on a weight.
    assert "MatMulInteger" in ops and {node.domain for node in graph.node} <= {""}
    # Smoothed: every quantized activation is divided by its calibrated channel factors first.
    smoothed = [node for node in graph.node if node.output[0].endswith("/smoothed")]
    quantized = [node for node in graph.node if node.output[0].endswith("/u8")]
    assert smoothed and len(smoothed) == len(quantized)
    float_weights = {t.name for t in graph.initializer if len(t.dims) == 2 and t.data_type == 1}
    assert not [
        node for node in graph.node if node.op_type == "MatMul" and node.input[1] in float_weights
    ]
