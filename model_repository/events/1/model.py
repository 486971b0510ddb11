"""Shoppers' events into the event log; logic in ecomsearch.serving.events."""

import triton_python_backend_utils as pb_utils

from ecomsearch.serving.events import EventsModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = EventsModel.from_triton_args(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
