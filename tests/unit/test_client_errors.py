"""The client's error types, from the statuses and messages tritonserver actually sends."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from ecomsearch.client import (
    BadRequestError,
    SearchError,
    SearchTimeoutError,
    ServiceUnavailableError,
)
from ecomsearch.client.errors import from_server_exception


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        # Messages as tritonserver 2.51 sent them (tests/integration, `ecomsearch chaos`).
        ("StatusCode.INVALID_ARGUMENT", "query 0 is empty or only whitespace", BadRequestError),
        ("StatusCode.UNAVAILABLE", "in ensemble 'search', Exceeds maximum queue size", None),
        ("StatusCode.UNAVAILABLE", "in ensemble 'search', Request timeout expired", None),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", SearchTimeoutError),
        (
            "StatusCode.INTERNAL",
            "in ensemble 'search', Stub process 'retrieve_0_1' is not healthy.",
            ServiceUnavailableError,
        ),
        ("StatusCode.INTERNAL", "select failed on this request (internal error 1a2b)", SearchError),
    ],
)
def test_server_errors_map_to_what_a_caller_can_act_on(status, message, kind) -> None:
    kind = kind or ServiceUnavailableError
    error = InferenceServerException(msg=message, status=status)
    wrapped = from_server_exception(error)
    assert type(wrapped) is kind
    assert wrapped.__cause__ is error and message in str(wrapped)
