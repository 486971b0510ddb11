"""Hybrid candidates and ranking features; logic in ecomsearch.serving.retrieve."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.retrieve import RetrieveModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = RetrieveModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
