"""The `events` model: shoppers' events into the store's event log, one transaction a request.

A request carries n events column-wise (user ids, product ids, kinds, and optionally quantities
and timestamps). The write is validated whole: a bad event, or one naming a product the live
catalog does not have, fails its request with INVALID_ARG and nothing of it is written, while
the other requests of the same `execute` are written as usual. The answer comes after the
commit: an acknowledged event is durable, and every recommending instance applies it before
its next request (see ecomsearch.serving.recommend).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.errors import RequestError
from ecomsearch.live.location import WRITE_KEY_ENV
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.serving.base import input_array
from ecomsearch.serving.writes import StoreWriter, byte_strings, decode_text
from ecomsearch.store import Event, UnknownProductsError


def parse_events(
    user_ids: np.ndarray | None,
    product_ids: np.ndarray | None,
    kinds: np.ndarray | None,
    quantities: np.ndarray | None,
    timestamps_s: np.ndarray | None,
    now_s: float,
) -> list[Event]:
    """A request's events (the store checks each value; here, the shapes and encodings)."""
    columns = {
        contract.EVENT_USER_IDS: user_ids,
        contract.EVENT_PRODUCT_IDS: product_ids,
        contract.EVENT_KINDS_INPUT: kinds,
    }
    texts: dict[str, list[str]] = {}
    for name, raw in columns.items():
        if raw is None:
            raise RequestError(f"input {name!r} is required")
        values = byte_strings(raw, name, "events", contract.MAX_EVENTS_PER_WRITE)
        texts[name] = [decode_text(v, f"{name}[{i}]") for i, v in enumerate(values)]
    n = len(texts[contract.EVENT_USER_IDS])
    for name, values in texts.items():
        if len(values) != n:
            raise RequestError(f"input {name!r} has {len(values)} values for {n} events")
    numbers = {}
    for name, raw, default in (
        (contract.EVENT_QUANTITIES, quantities, 1),
        (contract.EVENT_TIMESTAMPS, timestamps_s, now_s),
    ):
        if raw is None:
            numbers[name] = [default] * n
            continue
        if raw.shape != (n,):
            raise RequestError(f"input {name!r} must have shape [{n}], got {list(raw.shape)}")
        numbers[name] = raw.tolist()
    return [
        Event(
            user_id=user_id,
            product_id=product_id,
            kind=kind,
            timestamp_s=timestamp_s,
            quantity=quantity,
        )
        for user_id, product_id, kind, quantity, timestamp_s in zip(
            texts[contract.EVENT_USER_IDS],
            texts[contract.EVENT_PRODUCT_IDS],
            texts[contract.EVENT_KINDS_INPUT],
            numbers[contract.EVENT_QUANTITIES],
            numbers[contract.EVENT_TIMESTAMPS],
            strict=True,
        )
    ]


class EventsModel(StoreWriter):
    """Records events. `store` is a CatalogStore (this model is its connection's only user),
    or None when the served catalog is a file (every write is then UNSUPPORTED)."""

    what = "event write"

    def __init__(self, pb_utils, store, write_key: str | None = None, clock=time.time) -> None:
        super().__init__(pb_utils, write_key)
        self.store = store
        self.clock = clock  # the time an event without a timestamp gets

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> EventsModel:
        from ecomsearch.live.location import served_store_url
        from ecomsearch.store import open_store

        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        write_key = os.environ.get(WRITE_KEY_ENV) or None
        url = served_store_url(layout)
        if url is None:
            pb_utils.Logger.log_warn("events: no store (the catalog is a file): writes refused")
            return cls(pb_utils, None, write_key).instrumented(args)
        store = open_store(url)
        pb_utils.Logger.log_info(
            f"events: store {store.url}, event log at seq {store.events_head()}; "
            + ("writes need the write key" if write_key else "writes are open")
        )
        return cls(pb_utils, store, write_key).instrumented(args)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        return [self._handle(request) for request in requests]

    def parse(self, request) -> list[Event]:
        pb_utils = self.pb_utils
        return parse_events(
            input_array(pb_utils, request, contract.EVENT_USER_IDS),
            input_array(pb_utils, request, contract.EVENT_PRODUCT_IDS),
            input_array(pb_utils, request, contract.EVENT_KINDS_INPUT),
            input_array(pb_utils, request, contract.EVENT_QUANTITIES),
            input_array(pb_utils, request, contract.EVENT_TIMESTAMPS),
            now_s=self.clock(),
        )

    def _handle(self, request):
        pb_utils = self.pb_utils
        if self.store is None:
            return self.error(
                "this server's catalog is a file, not a store: it records no events",
                pb_utils.TritonError.UNSUPPORTED,
            )
        if not self.authorised(request):
            return self.unauthorised()
        started = time.perf_counter()
        try:
            events = self.parse(request)
            result = self.store.record_events(events)
        except UnknownProductsError as e:
            shown = ", ".join(repr(product_id) for product_id in e.ids[:5])
            more = f" and {len(e.ids) - 5} more" if len(e.ids) > 5 else ""
            return self.error(
                f"nothing was written: no live product {shown}{more} in the catalog",
                pb_utils.TritonError.INVALID_ARG,
            )
        except (RequestError, ValueError) as e:  # the store's checks raise ValueError
            return self.error(f"nothing was written: {e}", pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # the store failed, or a bug: INTERNAL, logged in full
            return self.internal(e)
        self.logger.log_verbose(
            f"events: {result.recorded} recorded, seq {result.last_seq}, "
            f"{(time.perf_counter() - started) * 1000:.1f} ms"
        )
        return self.acknowledge(result.last_seq, contract.RECORDED, result.recorded)
