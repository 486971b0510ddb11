"""A product's neighbours: embedding and co-purchase; logic in ecomsearch.serving.recommend."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.recommend import SimilarCandidatesModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = SimilarCandidatesModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
