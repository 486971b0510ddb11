"""BatchedModel's batching and error levels, its config helpers, and the test fake itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
    parameter,
    split_rows,
)
from tests.project import MODEL_REPOSITORY

PREPROCESS_CONFIG = MODEL_REPOSITORY / "preprocess" / "config.pbtxt"
RETRIEVE_CONFIG = MODEL_REPOSITORY / "retrieve" / "config.pbtxt"


class Doubler(BatchedModel):
    """y = 2x per row; a request with a negative value is malformed, and one with a value of
    13 is found malformed only while computing (a RequestError from `run`)."""

    def __init__(self, pb_utils, drop_rows: int = 0) -> None:
        super().__init__(pb_utils)
        self.runs: list[np.ndarray] = []
        self.drop_rows = drop_rows

    def parse(self, request) -> Tensors:
        x = input_array(self.pb_utils, request, "x")
        if x is None:
            raise RequestError("input 'x' is required")
        if (x < 0).any():
            raise RequestError("input 'x' must not be negative")
        inputs = {"x": x}
        tag = input_array(self.pb_utils, request, "tag")
        if tag is not None:
            inputs["tag"] = tag
        return inputs

    def run(self, inputs: Tensors) -> Tensors:
        self.runs.append(inputs["x"])
        if (inputs["x"] == 13).any():
            raise RequestError("13 is unlucky")
        y = inputs["x"] * 2
        return {"y": y[: len(y) - self.drop_rows]}


def rows(*values: float, width: int = 1) -> np.ndarray:
    return np.repeat(np.array(values, dtype=np.float32).reshape(-1, 1), width, axis=1)


def test_one_response_per_request_in_order_with_bad_ones_answered_invalid_arg(triton) -> None:
    model = Doubler(triton.pb_utils)
    requests = [
        triton.request(x=rows(1, 2)),
        triton.request(x=rows(-1)),
        triton.request(),
        triton.request(x=rows(3)),
        triton.request(x=rows(4, 5, 6)),
    ]

    responses = model.execute(requests)

    assert len(responses) == 5
    np.testing.assert_array_equal(triton.outputs(responses[0])["y"], rows(2, 4))
    triton.assert_invalid_arg(responses[1], "negative")
    triton.assert_invalid_arg(responses[2], "'x' is required")
    np.testing.assert_array_equal(triton.outputs(responses[3])["y"], rows(6))
    np.testing.assert_array_equal(triton.outputs(responses[4])["y"], rows(8, 10, 12))
    # One run over the good requests' rows, concatenated in request order.
    assert [x.ravel().tolist() for x in model.runs] == [[1, 2, 3, 4, 5, 6]]


def test_requests_that_cannot_be_stacked_run_apart(triton) -> None:
    model = Doubler(triton.pb_utils)
    responses = model.execute(
        [
            triton.request(x=rows(1, width=2)),
            triton.request(x=rows(2, 3, width=3)),
            triton.request(x=rows(4, width=2)),
        ]
    )
    assert [triton.outputs(r)["y"].tolist() for r in responses] == [
        [[2, 2]],
        [[4, 4, 4], [6, 6, 6]],
        [[8, 8]],
    ]
    assert sorted(x.shape for x in model.runs) == [(2, 2), (2, 3)]


def test_a_request_rejected_while_computing_fails_alone(triton) -> None:
    model = Doubler(triton.pb_utils)
    responses = model.execute(
        [triton.request(x=rows(1)), triton.request(x=rows(13, 2)), triton.request(x=rows(3))]
    )
    np.testing.assert_array_equal(triton.outputs(responses[0])["y"], rows(2))
    triton.assert_invalid_arg(responses[1], "unlucky")
    np.testing.assert_array_equal(triton.outputs(responses[2])["y"], rows(6))
    # The batch, then each request alone to find the culprit.
    assert [x.ravel().tolist() for x in model.runs] == [[1, 13, 2, 3], [1], [13, 2], [3]]


def test_inputs_that_disagree_on_the_batch_size_are_a_bad_request(triton) -> None:
    model = Doubler(triton.pb_utils)
    (response,) = model.execute([triton.request(x=rows(1, 2), tag=rows(7))])
    triton.assert_invalid_arg(response, "batch size", "'x': 2", "'tag': 1")
    assert model.runs == []


def test_finish_shapes_each_requests_outputs_after_the_split(triton) -> None:
    class Summing(Doubler):
        def finish(self, outputs: Tensors) -> Tensors:
            return {"y": outputs["y"], "total": np.full(len(outputs["y"]), outputs["y"].sum())}

    responses = Summing(triton.pb_utils).execute(
        [triton.request(x=rows(1, 2)), triton.request(x=rows(10))]
    )
    assert triton.outputs(responses[0])["total"].tolist() == [6, 6]
    assert triton.outputs(responses[1])["total"].tolist() == [20]


def test_when_every_request_is_bad_nothing_runs(triton) -> None:
    model = Doubler(triton.pb_utils)
    responses = model.execute([triton.request(x=rows(-1)), triton.request()])
    assert [r.error().code() for r in responses] == [triton.pb_utils.TritonError.INVALID_ARG] * 2
    assert model.runs == []


def test_no_requests_give_no_responses(triton) -> None:
    assert Doubler(triton.pb_utils).execute([]) == []


def test_a_run_that_loses_rows_is_a_model_error(triton) -> None:
    model = Doubler(triton.pb_utils, drop_rows=1)
    with pytest.raises(
        triton.pb_utils.TritonModelException, match="'y' has 1 rows for a batch of 2"
    ):
        model.execute([triton.request(x=rows(1)), triton.request(x=rows(2))])


def assert_internal_without_traceback(triton, response) -> str:
    """The response is INTERNAL naming a logged error id, with no code or path in it; returns
    the id."""
    error = response.error()
    assert error is not None and error.code() == triton.pb_utils.TritonError.INTERNAL, error
    message = error.message()
    assert "Traceback" not in message and "/" not in message and ".py" not in message, message
    error_id = message.split("internal error ")[1].split(",")[0]
    (logged,) = [m for m in triton.logged("ERROR") if error_id in m]
    assert "Traceback" in logged  # the operator gets the whole story
    return error_id


def test_an_unexpected_parse_failure_is_internal_with_the_traceback_only_in_the_log(
    triton,
) -> None:
    class Broken(Doubler):
        def parse(self, request):
            if input_array(self.pb_utils, request, "x")[0, 0] == 7:
                raise KeyError("a bug, not a bad request")
            return super().parse(request)

    responses = Broken(triton.pb_utils).execute(
        [triton.request(x=rows(1)), triton.request(x=rows(7)), triton.request(x=rows(2))]
    )
    assert_internal_without_traceback(triton, responses[1])
    assert triton.outputs(responses[0])["y"].tolist() == [[2]]
    assert triton.outputs(responses[2])["y"].tolist() == [[4]]


def test_a_bug_one_request_triggers_in_run_fails_only_that_request(triton) -> None:
    class IndexesByValue(Doubler):
        def run(self, inputs: Tensors) -> Tensors:
            self.runs.append(inputs["x"])
            table = np.arange(10, dtype=np.float32)
            return {"y": table[inputs["x"].astype(int)]}  # IndexError on 10 and above

    model = IndexesByValue(triton.pb_utils)
    responses = model.execute(
        [triton.request(x=rows(1)), triton.request(x=rows(11)), triton.request(x=rows(3))]
    )
    first, second = (assert_internal_without_traceback(triton, responses[1]) for _ in range(2))
    assert first == second
    assert triton.outputs(responses[0])["y"].tolist() == [[1]]
    assert triton.outputs(responses[2])["y"].tolist() == [[3]]
    # Once together, then each alone.
    assert [len(x) for x in model.runs] == [3, 1, 1, 1]


def test_split_rows_gives_each_request_its_rows() -> None:
    pieces = split_rows(np.arange(12).reshape(6, 2), [1, 3, 2])
    assert [p.tolist() for p in pieces] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert split_rows(np.zeros((0, 2)), []) == []


@pytest.mark.parametrize("counts", [[1, 2], [4, 3], []])
def test_split_rows_refuses_counts_that_do_not_cover_the_batch(counts: list[int]) -> None:
    with pytest.raises(AssertionError, match="cannot be split"):
        split_rows(np.zeros((6, 2)), counts)


def test_config_helpers_read_tritons_json(triton) -> None:
    config = model_config(triton.args(RETRIEVE_CONFIG, RETRIEVE_CONFIG.parent))
    assert parameter(config, "vector_pool", "elsewhere") == "200"
    assert parameter(config, "not_there", "fallback") == "fallback"
    assert int_parameter(config, "lexical_pool", 1) == 200
    assert int_parameter(config, "not_there", 7) == 7


@pytest.mark.parametrize(
    ("raw", "minimum", "fragment"),
    [("ten", 0, "must be an integer, got 'ten'"), ("3", 5, "must be >= 5, got 3")],
)
def test_int_parameter_refuses_bad_values(raw: str, minimum: int, fragment: str) -> None:
    config = {"parameters": {"max_top_k": {"string_value": raw}}}
    with pytest.raises(ValueError, match="'max_top_k'") as raised:
        int_parameter(config, "max_top_k", 10, minimum)
    assert fragment in str(raised.value)


def test_args_match_what_tritonserver_passes(triton, tmp_path) -> None:
    args = triton.args(PREPROCESS_CONFIG, tmp_path, instance_kind="GPU", device_id=3)
    assert {k: v for k, v in args.items() if k != "model_config"} == {
        "model_instance_kind": "GPU",
        "model_instance_name": "preprocess_0_0",
        "model_instance_device_id": "3",
        "model_repository": str(tmp_path),
        "model_version": "1",
        "model_name": "preprocess",
    }
    config = json.loads(args["model_config"])
    inputs = {tensor["name"]: tensor for tensor in config["input"]}
    assert set(inputs) == {"query", "max_tokens"}
    query, max_tokens = inputs["query"], inputs["max_tokens"]
    assert (query["data_type"], query["dims"], query["optional"]) == ("TYPE_STRING", [1], False)
    # Defaults are printed, as tritonserver does: `optional` is there even when false.
    assert (max_tokens["data_type"], max_tokens["optional"]) == ("TYPE_INT32", True)
    assert config["max_batch_size"] == 64
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse(Path(PREPROCESS_CONFIG).read_text(), model_config_pb2.ModelConfig())
    # An int64 field: a string in protobuf's JSON, a number in what tritonserver passes.
    delay_us = config["dynamic_batching"]["max_queue_delay_microseconds"]
    assert isinstance(delay_us, int)
    assert delay_us == parsed.dynamic_batching.max_queue_delay_microseconds
    assert triton.pb_utils.triton_string_to_numpy(query["data_type"]) is np.object_


def test_the_fake_backend_module_is_strict(pb_utils) -> None:
    with pytest.raises(AttributeError):
        pb_utils.InferenceResponce  # noqa: B018
    with pytest.raises(pb_utils.TritonModelException, match="empty string"):
        pb_utils.Tensor("", np.zeros(1, np.float32))
    with pytest.raises(pb_utils.TritonModelException, match="dtype is not supported"):
        pb_utils.Tensor("titles", np.array(["unicode, not bytes"]))
    with pytest.raises(TypeError):
        pb_utils.InferenceResponse(output_tensors=[np.zeros(1)])
    with pytest.raises(TypeError):
        pb_utils.Logger.log_info(42)
    with pytest.raises(KeyError):
        pb_utils.triton_string_to_numpy("FP32")
    error = pb_utils.TritonError("bad top_k", pb_utils.TritonError.INVALID_ARG)
    assert (error.message(), error.code()) == ("bad top_k", pb_utils.TritonError.INVALID_ARG)
    assert pb_utils.TritonError("boom").code() == pb_utils.TritonError.INTERNAL


def test_the_fake_tensor_is_contiguous_like_the_real_one(pb_utils) -> None:
    sliced = np.arange(12, dtype=np.float32).reshape(3, 4)[:, :2]
    tensor = pb_utils.Tensor("scores", sliced)
    assert tensor.as_numpy().flags.c_contiguous
    np.testing.assert_array_equal(tensor.as_numpy(), sliced)
    request = pb_utils.InferenceRequest(inputs=[tensor])
    assert pb_utils.get_input_tensor_by_name(request, "scores") is tensor
    assert pb_utils.get_input_tensor_by_name(request, "titles") is None
    response = pb_utils.InferenceResponse([tensor])
    assert pb_utils.get_output_tensor_by_name(response, "scores") is tensor
    assert not response.has_error() and response.error() is None


def test_a_model_caps_the_native_thread_pools_of_its_process_at_one_thread(
    triton, monkeypatch
) -> None:
    # Idle workers spin on the cores that the other instances need (ecomsearch.serving.base).
    import os

    from threadpoolctl import threadpool_info, threadpool_limits

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with threadpool_limits(limits=2, user_api="blas"):
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
        Doubler(triton.pb_utils)
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas, "numpy links a BLAS library"
        assert {pool["num_threads"] for pool in blas} == {1}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
