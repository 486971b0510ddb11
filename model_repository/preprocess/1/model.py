"""Query text to token ids; logic in ecomsearch.serving.preprocess."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.preprocess import PreprocessModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = PreprocessModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)
