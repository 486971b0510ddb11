"""A Python-based drop-in for Triton's native ONNX Runtime backend.

The pytriton wheel's tritonserver has no onnxruntime backend. Installed as
`<backend-dir>/onnxruntime/model.py`, this serves models whose config says
`backend: "onnxruntime"`, so one model repository runs unchanged here and in the NGC container
(where the native backend takes precedence). It honours the native backend's thread parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    Tensors,
    input_array,
    int_parameter,
    model_config,
)


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
        return cls(pb_utils, session, config)

    def parse(self, request) -> Tensors:
        inputs = {}
        for name in self.input_names:
            value = input_array(self.pb_utils, request, name)
            if value is None:
                raise RequestError(f"input {name!r} is required")
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
