"""A Python-based drop-in for Triton's native ONNX Runtime backend.

The pytriton wheel's tritonserver has no onnxruntime backend. Installed as
`<backend-dir>/onnxruntime/model.py`, this serves models whose config says
`backend: "onnxruntime"`, so one model repository runs unchanged here and in the NGC container
(where the native backend takes precedence). It honours the native backend's thread parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
)


@dataclass(frozen=True)
class InputLimits:
    """What one input of the project's ONNX models may hold, checked before ONNX Runtime runs.

    ONNX Runtime reads a negative token id from the end of the embedding table instead of
    failing, and works as long as it is asked to on any sequence or candidate count, so a direct
    caller of an inner model is held to the contract here.
    """

    max_length: int | None = None  # of axis 1, the axis after the batch
    minimum: float | None = None
    maximum: float | None = None


INPUT_LIMITS: dict[str, InputLimits] = {
    contract.INPUT_IDS: InputLimits(max_length=contract.MAX_SEQUENCE_LENGTH, minimum=0),
    contract.ATTENTION_MASK: InputLimits(
        max_length=contract.MAX_SEQUENCE_LENGTH, minimum=0, maximum=1
    ),
    contract.CANDIDATE_FEATURES: InputLimits(max_length=contract.MAX_CANDIDATES),
}


def check_input(name: str, value: np.ndarray) -> None:
    """Raises RequestError if `value` breaks INPUT_LIMITS or, for any float input, is not finite."""
    if value.size == 0:
        raise RequestError(f"input {name!r} is empty (shape {value.shape})")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise RequestError(f"input {name!r} must be finite (NaN or infinity found)")
    limits = INPUT_LIMITS.get(name)
    if limits is None:
        return
    if limits.max_length is not None and value.ndim > 1 and value.shape[1] > limits.max_length:
        raise RequestError(
            f"input {name!r} has length {value.shape[1]}; the maximum is {limits.max_length}"
        )
    if limits.minimum is not None and value.min() < limits.minimum:
        raise RequestError(f"input {name!r} has a value below {limits.minimum:g}")
    if limits.maximum is not None and value.max() > limits.maximum:
        raise RequestError(f"input {name!r} has a value above {limits.maximum:g}")


def _session_options(config: dict[str, Any]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Same parameter names as the native backend, so one config.pbtxt tunes both.
    options.intra_op_num_threads = int_parameter(config, "intra_op_thread_count", 0)
    options.inter_op_num_threads = int_parameter(config, "inter_op_thread_count", 0)
    return options


def _providers(instance_kind: str, device_id: int) -> list[Any]:
    import onnxruntime as ort

    if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeModel(BatchedModel):
    def __init__(self, pb_utils, session, config: dict[str, Any]) -> None:
        super().__init__(pb_utils)
        self.session = session
        self.input_names = [i["name"] for i in config["input"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        self.output_names = list(self.output_dtypes)
        graph_inputs = {i.name for i in session.get_inputs()}
        graph_outputs = {o.name: o.shape for o in session.get_outputs()}
        if set(self.input_names) != graph_inputs or not set(self.output_names) <= set(
            graph_outputs
        ):
            raise pb_utils.TritonModelException(
                f"config tensors (inputs {sorted(self.input_names)}, outputs "
                f"{sorted(self.output_names)}) do not match the ONNX graph (inputs "
                f"{sorted(graph_inputs)}, outputs {sorted(graph_outputs)})"
            )
        # Like the native backend: a fixed graph dimension must equal the configured one.
        for output in config["output"]:
            graph_dims = graph_outputs[output["name"]][1:]
            config_dims = [int(d) for d in output["dims"]]
            for graph_dim, config_dim in zip(graph_dims, config_dims, strict=False):
                if isinstance(graph_dim, int) and config_dim != -1 and graph_dim != config_dim:
                    raise pb_utils.TritonModelException(
                        f"output {output['name']!r}: config dims {config_dims} do not match the "
                        f"ONNX graph's {graph_dims}"
                    )
        from onnxruntime.capi.onnxruntime_pybind11_state import (
            Fail,
            InvalidArgument,
            RuntimeException,
        )

        self._runtime_errors = (Fail, InvalidArgument, RuntimeException)

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> OnnxRuntimeModel:
        import onnxruntime as ort

        config = model_config(args)
        filename = config.get("default_model_filename") or "model.onnx"
        path = Path(args["model_repository"]) / str(args["model_version"]) / filename
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"{path} not found; run `ecomsearch export-encoder` (or the model's export command)"
            )
        session = ort.InferenceSession(
            str(path),
            _session_options(config),
            providers=_providers(
                args["model_instance_kind"], int(args["model_instance_device_id"])
            ),
        )
        pb_utils.Logger.log_info(
            f"onnxruntime (python drop-in): {path} on {session.get_providers()[0]}"
        )
        return cls(pb_utils, session, config).instrumented(args)

    def parse(self, request) -> Tensors:
        inputs = {}
        for name in self.input_names:
            value = input_array(self.pb_utils, request, name)
            if value is None:
                raise RequestError(f"input {name!r} is required")
            check_input(name, value)
            inputs[name] = value
        return inputs

    def run(self, inputs: Tensors) -> Tensors:
        try:
            results = self.session.run(self.output_names, inputs)
        except self._runtime_errors as e:
            # Say, input_ids and attention_mask of different lengths. The batching base then
            # runs the batch's requests one by one, so only the bad one fails.
            raise RequestError(f"ONNX Runtime rejected the inputs: {e}") from None
        return {
            name: result.astype(self.output_dtypes[name], copy=False)
            for name, result in zip(self.output_names, results, strict=True)
        }
