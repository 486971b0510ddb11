"""Upserts and deletes of the live catalog; logic in ecomsearch.serving.catalog."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.catalog import CatalogModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = CatalogModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
