"""Top-k candidates by score, as product ids and titles; logic in ecomsearch.serving.select."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.select import SelectModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = SelectModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
