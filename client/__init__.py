"""Thin client for the `search` ensemble and the `catalog` writer: needs only tritonclient[grpc]
and numpy."""

from ecomsearch.client.aio import AsyncSearchClient
from ecomsearch.client.errors import (
    BadRequestError,
    SearchError,
    SearchTimeoutError,
    ServiceUnavailableError,
)
from ecomsearch.client.protocol import Filters, Hit, WriteAck
from ecomsearch.client.sync import SearchClient

__all__ = [
    "AsyncSearchClient",
    "BadRequestError",
    "Filters",
    "Hit",
    "SearchClient",
    "SearchError",
    "SearchTimeoutError",
    "ServiceUnavailableError",
    "WriteAck",
]
