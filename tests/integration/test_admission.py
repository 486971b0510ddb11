"""Admission control, served for real: a short version of `ecomsearch overload` (the full
60-second run is a command of its own, with figures in the README's reliability section)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from ecomsearch import contract
from ecomsearch.client import ServiceUnavailableError
from ecomsearch.client.errors import from_server_exception
from ecomsearch.loadtest.bench import load_queries
from ecomsearch.loadtest.overload import OverloadSettings, run_overload
from ecomsearch.paths import default_queries
from tests.project import MODEL_REPOSITORY

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def queue_timeout_ms() -> float:
    """The most an admitted request can wait in the queue of the gate, the only stage with a
    queue policy (see model_repository/query_encoder/config.pbtxt)."""
    config = text_format.Parse(
        (MODEL_REPOSITORY / contract.ENCODER_MODEL / "config.pbtxt").read_text(),
        mc.ModelConfig(),
    )
    return config.dynamic_batching.default_queue_policy.default_timeout_microseconds / 1000


@pytest.fixture(scope="module")
def overload_report(grpc_url) -> dict:
    settings = OverloadSettings(
        multiple=2.0, duration_s=8.0, saturation_seconds=5.0, client_timeout_s=2.0
    )
    return run_overload(grpc_url, load_queries(default_queries()), settings)


def test_twice_saturation_is_shed_fast_not_queued_past_the_deadline(overload_report) -> None:
    overload = overload_report["overload"]
    assert overload_report["busy_load"]["errors"] == 0  # the normal busy load is never shed
    assert overload["shed"] > 0, overload
    assert overload["past_deadline"] == 0 and overload["errors"] == 0, overload
    assert all(
        "queue" in message or "timeout" in message for message in overload["shed_messages"]
    ), overload["shed_messages"]
    # Still answering about as much as it can: at least half the busy-load throughput.
    assert overload["accepted_rps"] >= 0.5 * overload_report["saturation_rps"], overload


def test_accepted_requests_wait_at_most_the_queue_timeout_plus_service_time(
    overload_report,
) -> None:
    overload = overload_report["overload"]
    # Service time under this load: the busy (c=16) p99, doubled for the larger batches an
    # overloaded server forms and for the load generator sharing the cores.
    service_ms = 2 * overload_report["busy_load"]["p99_ms"]
    assert overload["accepted_p99_ms"] <= queue_timeout_ms() + service_ms, overload
    assert overload["accepted_max_ms"] < 1000 * overload["client_timeout_s"], overload


def test_latency_is_normal_again_within_two_seconds_of_the_load_stopping(overload_report) -> None:
    assert overload_report["recovery_s"] is not None
    assert overload_report["recovery_s"] <= 2.0, overload_report


def test_the_client_raises_a_shed_request_as_service_unavailable(overload_report) -> None:
    (message, _), *_ = overload_report["overload"]["shed_messages"].items()
    error = InferenceServerException(msg=message, status="StatusCode.UNAVAILABLE")
    wrapped = from_server_exception(error)
    assert isinstance(wrapped, ServiceUnavailableError) and wrapped.__cause__ is error
