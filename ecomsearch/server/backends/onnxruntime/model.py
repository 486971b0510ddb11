"""Triton Python-based backend named `onnxruntime`; see ecomsearch.serving.onnx_runtime."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.onnx_runtime import OnnxRuntimeModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = OnnxRuntimeModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
