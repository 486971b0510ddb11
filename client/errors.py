"""The client's own errors; each wraps the tritonclient exception it came from (`__cause__`)."""

from __future__ import annotations


class SearchError(Exception):
    """Base class: the search could not be served."""


class BadRequestError(SearchError, ValueError):
    """The request is malformed (rejected locally, or INVALID_ARGUMENT from the server)."""


class ServiceUnavailableError(SearchError):
    """The server is unreachable, not ready, or overloaded; retrying later may succeed."""


class SearchTimeoutError(SearchError, TimeoutError):
    """No answer within `timeout_s`."""


# gRPC status codes as tritonclient reports them (`InferenceServerException.status()`).
_BY_STATUS: dict[str, type[SearchError]] = {
    "StatusCode.INVALID_ARGUMENT": BadRequestError,
    "StatusCode.OUT_OF_RANGE": BadRequestError,
    "StatusCode.UNAVAILABLE": ServiceUnavailableError,
    "StatusCode.RESOURCE_EXHAUSTED": ServiceUnavailableError,
    "StatusCode.NOT_FOUND": ServiceUnavailableError,  # model not loaded (yet)
    "StatusCode.DEADLINE_EXCEEDED": SearchTimeoutError,
}


# tritonserver answers INTERNAL for a request that reached a model instance whose process had
# died; the server replaces the instance within seconds, so a retry may well succeed.
_DEAD_INSTANCE = "is not healthy"


def from_server_exception(error: Exception) -> SearchError:
    """Maps a tritonclient InferenceServerException to the matching SearchError."""
    status = getattr(error, "status", lambda: None)()
    message = getattr(error, "message", lambda: None)() or str(error)
    kind = _BY_STATUS.get(str(status), SearchError)
    if str(status) == "StatusCode.INTERNAL" and _DEAD_INSTANCE in message:
        kind = ServiceUnavailableError
    wrapped = kind(f"{message} ({status})" if status else message)
    wrapped.__cause__ = error
    return wrapped
