"""Thin client for the `search` ensemble: needs only tritonclient[grpc] and numpy."""

from ecomsearch.client.aio import AsyncSearchClient
from ecomsearch.client.errors import (
    BadRequestError,
    SearchError,
    SearchTimeoutError,
    ServiceUnavailableError,
)
from ecomsearch.client.protocol import Hit
from ecomsearch.client.sync import SearchClient

__all__ = [
    "AsyncSearchClient",
    "BadRequestError",
    "Hit",
    "SearchClient",
    "SearchError",
    "SearchTimeoutError",
    "ServiceUnavailableError",
]
