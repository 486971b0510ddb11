"""Locust load test over gRPC: searches back to back (scenario `search`, the default), or
shoppers who search, ask for recommendations and are recorded viewing what they found
(scenario `shopper`).

Headless through `ecomsearch loadtest [--scenario shopper]`, or with Locust's web UI:
    locust -f loadtest/locustfile.py --host localhost:8001
Environment: ECOMSEARCH_SCENARIO (search or shopper, default search), ECOMSEARCH_QUERIES (a
queries file, default loadtest/queries.txt), ECOMSEARCH_TOP_K (default 10),
ECOMSEARCH_TIMEOUT_S (default 10), ECOMSEARCH_WRITE_KEY (sent with the shoppers' events),
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
SCENARIOS = ("search", "shopper")
SCENARIO = os.environ.get("ECOMSEARCH_SCENARIO", "search")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"ECOMSEARCH_SCENARIO must be one of {SCENARIOS}, got {SCENARIO!r}")
WRITE_KEY = os.environ.get("ECOMSEARCH_WRITE_KEY")

QUERIES = [
    line.strip()
    for line in QUERIES_FILE.read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]
# Locust rounds response times (whole milliseconds below 100 ms); keep exact ones too, by call.
LATENCIES_MS: dict[str, list[float]] = {}


def timed(name: str, call) -> object | None:
    """Runs one gRPC call, reports it to Locust under `name`, and returns its result (None if
    it failed)."""
    exception, result, length = None, None, 0
    began = time.perf_counter()
    try:
        result = call()
        ids = result.as_numpy(contract.PRODUCT_IDS)
        length = int(ids.shape[-1]) if ids is not None else 0
    except InferenceServerException as e:
        exception = e
    elapsed_ms = (time.perf_counter() - began) * 1000.0
    if exception is None:
        LATENCIES_MS.setdefault(name, []).append(elapsed_ms)
    events.request.fire(
        request_type="grpc",
        name=name,
        response_time=elapsed_ms,
        response_length=length,
        exception=exception,
        context={},
    )
    return result


class SearchUser(User):
    """One gRPC client per simulated shopper, sending searches back to back (closed loop)."""

    abstract = SCENARIO != "search"
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
        timed(
            contract.SEARCH_MODEL,
            lambda: self.triton.infer(
                contract.SEARCH_MODEL, inputs, outputs=self.outputs, client_timeout=TIMEOUT_S
            ),
        )

    def on_stop(self) -> None:
        # Close the channel, or gevent-patched gRPC keeps the process alive at exit.
        self.triton.close()


class ShopperUser(User):
    """A shopper, closed loop: searches (6 in 10 calls), asks for recommendations (3 in 10)
    and is recorded viewing one of the products found (1 in 10), so `recommend` answers from
    events that keep arriving while it is measured."""

    abstract = SCENARIO != "shopper"
    wait_time = constant(0)

    def on_start(self) -> None:
        self.triton = grpcclient.InferenceServerClient(url=self.host)
        self.user_id = f"locust-shopper-{random.randrange(10**9)}"
        self.recommend_inputs = protocol.build_recommend_inputs(grpcclient, self.user_id, TOP_K)
        self.requests = [protocol.build_inputs(grpcclient, [q], TOP_K) for q in QUERIES]
        self.outputs = protocol.build_outputs(grpcclient)
        self.seen: list[str] = []
        self.parameters = {contract.WRITE_KEY_PARAMETER: WRITE_KEY} if WRITE_KEY else None

    @task(6)
    def search(self) -> None:
        inputs = random.choice(self.requests)
        result = timed(
            contract.SEARCH_MODEL,
            lambda: self.triton.infer(
                contract.SEARCH_MODEL, inputs, outputs=self.outputs, client_timeout=TIMEOUT_S
            ),
        )
        if result is not None:
            self.seen = [pid.decode() for pid in result.as_numpy(contract.PRODUCT_IDS)[0] if pid]

    @task(3)
    def recommend(self) -> None:
        timed(
            contract.RECOMMEND_MODEL,
            lambda: self.triton.infer(
                contract.RECOMMEND_MODEL,
                self.recommend_inputs,
                outputs=self.outputs,
                client_timeout=TIMEOUT_S,
            ),
        )

    @task(1)
    def view(self) -> None:
        if not self.seen:
            return
        event = protocol.ShopperEvent(self.user_id, random.choice(self.seen), "view")
        inputs = protocol.build_event_inputs(grpcclient, [event])
        timed(
            contract.EVENTS_MODEL,
            lambda: self.triton.infer(
                contract.EVENTS_MODEL,
                inputs,
                client_timeout=TIMEOUT_S,
                parameters=self.parameters,
            ),
        )

    def on_stop(self) -> None:
        self.triton.close()


@events.quitting.add_listener
def write_precise_percentiles(environment, **_kwargs) -> None:
    if not LATENCY_FILE or not LATENCIES_MS:
        return

    def summary(values: list[float]) -> dict[str, float]:
        latencies = np.array(values)
        return {
            "requests": len(latencies),
            **{f"p{q}_ms": round(float(np.percentile(latencies, q)), 3) for q in (50, 90, 99)},
            "mean_ms": round(float(latencies.mean()), 3),
        }

    # Search's figures at the top (as before the shopper scenario), every call's by name.
    report = {
        **summary(LATENCIES_MS.get(contract.SEARCH_MODEL, [])),
        "by_call": {name: summary(values) for name, values in LATENCIES_MS.items()},
    }
    Path(LATENCY_FILE).write_text(json.dumps(report, indent=2) + "\n")
