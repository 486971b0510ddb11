"""Errors of the core that callers tell apart by type. Dependency-free."""

from __future__ import annotations


class RequestError(ValueError):
    """One request is malformed. A served model answers it with INVALID_ARG while the requests
    batched with it still run; the in-process pipeline raises it to its caller."""
