"""Locust load test of the `search` ensemble over gRPC.

Headless through `ecomsearch loadtest`, or with Locust's web UI:
    locust -f loadtest/locustfile.py --host localhost:8001
Environment: ECOMSEARCH_QUERIES (a queries file, default loadtest/queries.txt),
ECOMSEARCH_TOP_K (default 10), ECOMSEARCH_TIMEOUT_S (default 10),
ECOMSEARCH_LATENCY_FILE (where precise percentiles are written at the end).
"""

# gRPC must cooperate with gevent before anything creates a channel.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from ecomsearch import contract  # noqa: E402
from ecomsearch.client import protocol  # noqa: E402

QUERIES_FILE = Path(os.environ.get("ECOMSEARCH_QUERIES", Path(__file__).with_name("queries.txt")))
TOP_K = int(os.environ.get("ECOMSEARCH_TOP_K", contract.DEFAULT_TOP_K))
TIMEOUT_S = float(os.environ.get("ECOMSEARCH_TIMEOUT_S", "10"))
LATENCY_FILE = os.environ.get("ECOMSEARCH_LATENCY_FILE")

QUERIES = [
    line.strip()
    for line in QUERIES_FILE.read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]
# Locust rounds response times (whole milliseconds below 100 ms); keep exact ones too.
LATENCIES_MS: list[float] = []


class SearchUser(User):
    """One gRPC client per simulated shopper, sending searches back to back (closed loop)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.triton = grpcclient.InferenceServerClient(url=self.host)
        # Requests are built up front: the loop measures the service, not numpy.
        self.requests = [protocol.build_inputs(grpcclient, [q], TOP_K) for q in QUERIES]
        self.outputs = protocol.build_outputs(grpcclient)
        self.position = random.randrange(len(self.requests))

    @task
    def search(self) -> None:
        inputs = self.requests[self.position % len(self.requests)]
        self.position += 1
        exception, length = None, 0
        began = time.perf_counter()
        try:
            result = self.triton.infer(
                contract.SEARCH_MODEL, inputs, outputs=self.outputs, client_timeout=TIMEOUT_S
            )
            length = int(result.as_numpy(contract.PRODUCT_IDS).shape[1])
        except InferenceServerException as e:
            exception = e
        elapsed_ms = (time.perf_counter() - began) * 1000.0
        if exception is None:
            LATENCIES_MS.append(elapsed_ms)
        events.request.fire(
            request_type="grpc",
            name=contract.SEARCH_MODEL,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    def on_stop(self) -> None:
        # Close the channel, or gevent-patched gRPC keeps the process alive at exit.
        self.triton.close()


@events.quitting.add_listener
def write_precise_percentiles(environment, **_kwargs) -> None:
    if not LATENCY_FILE or not LATENCIES_MS:
        return
    latencies = np.array(LATENCIES_MS)
    summary = {
        "requests": len(latencies),
        **{f"p{q}_ms": round(float(np.percentile(latencies, q)), 3) for q in (50, 90, 99)},
        "mean_ms": round(float(latencies.mean()), 3),
    }
    Path(LATENCY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
