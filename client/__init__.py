"""Thin client for `search`, `recommend` and `similar`, and the `catalog` and `events` writers:
needs only tritonclient[grpc] and numpy."""

from ecomsearch.client.aio import AsyncSearchClient
from ecomsearch.client.errors import (
    BadRequestError,
    SearchError,
    SearchTimeoutError,
    ServiceUnavailableError,
)
from ecomsearch.client.protocol import EventsAck, Filters, Hit, ShopperEvent, WriteAck
from ecomsearch.client.sync import SearchClient

__all__ = [
    "AsyncSearchClient",
    "BadRequestError",
    "EventsAck",
    "Filters",
    "Hit",
    "SearchClient",
    "SearchError",
    "SearchTimeoutError",
    "ServiceUnavailableError",
    "ShopperEvent",
    "WriteAck",
]
