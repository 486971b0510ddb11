"""Building `search`, `recommend`, `similar`, `catalog` and `events` requests and reading their
responses; shared by the sync and async clients. Each check here is the server's own rule,
applied before anything is sent."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ecomsearch import contract
from ecomsearch.client.errors import BadRequestError
from ecomsearch.query import visible_text

# What every `search` answer has; `prices` and `in_stock` come from servers with a live catalog.
OUTPUTS = (contract.PRODUCT_IDS, contract.SCORES, contract.TITLES)
WRITE_OUTPUTS = (contract.SEQUENCE_NUMBER, contract.CHANGED)
EVENT_OUTPUTS = (contract.SEQUENCE_NUMBER, contract.RECORDED)
# Prices travel as FP32: a bound beyond it is infinite on the server, not a price.
_FP32_MAX = float(np.finfo(np.float32).max)
# A write embeds what changed before it answers: seconds for a large one on a CPU.
DEFAULT_WRITE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Hit:
    product_id: str
    score: float
    title: str
    price: float | None = None  # None: the product has no price, or the server does not say
    in_stock: bool | None = None  # None: the server does not say
    # With search(explain=True): the score's parts, as the server computed them; its
    # "base_value", "contributions" (feature -> share of the ranker score) and
    # "personalisation" (a shopper's search) sum to `score`. See docs/relevance.md.
    explanation: dict | None = None


@dataclass(frozen=True)
class WriteAck:
    """A committed write: the catalog's change number after it, and the products it changed
    (deletes of unknown ids change nothing)."""

    sequence_number: int
    changed: int


@dataclass(frozen=True)
class EventsAck:
    """Committed events: the event log's sequence number after them, and how many."""

    sequence_number: int
    recorded: int


@dataclass(frozen=True)
class ShopperEvent:
    """What a shopper did: viewed, carted or purchased (`kind`) a product. `timestamp_s` is
    when, in seconds since the epoch (UTC); None means now, as the server's clock has it."""

    user_id: str
    product_id: str
    kind: str = "view"
    quantity: int = 1
    timestamp_s: float | None = None


def validate_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= contract.MAX_TOP_K:
        raise BadRequestError(f"k must be an integer between 1 and {contract.MAX_TOP_K}, got {k!r}")


def validate(queries: Sequence[str], k: int) -> None:
    """Rejects what the server would reject, before anything is sent."""
    if isinstance(queries, str):
        raise BadRequestError("expected a sequence of queries, got one string")
    if not queries:
        raise BadRequestError("no queries given")
    validate_k(k)
    for position, query in enumerate(queries):
        # The server's own rule, so a query of zero-width spaces fails here, not after a trip.
        if not isinstance(query, str) or not visible_text(query):
            raise BadRequestError(f"query {position} must be a string with something to search")
        if len(query.encode("utf-8")) > contract.MAX_QUERY_BYTES:
            raise BadRequestError(
                f"query {position} is longer than {contract.MAX_QUERY_BYTES} bytes"
            )


@dataclass(frozen=True)
class Filters:
    """Restrictions applied to every query of a call; None (and in_stock False) filters nothing.

    `category` is a category path prefix ("Components > Storage"), `brand` is compared
    case-insensitively, prices are inclusive bounds (products without a price fail either),
    `in_stock=True` keeps products in stock only."""

    category: str | None = None
    brand: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    in_stock: bool | None = None

    def validate(self) -> None:
        for name, value in (
            (contract.FILTER_CATEGORY, self.category),
            (contract.FILTER_BRAND, self.brand),
        ):
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise BadRequestError(f"{name} must be a string, got {type(value).__name__}")
            if len(value.encode("utf-8")) > contract.MAX_FILTER_BYTES:
                raise BadRequestError(f"{name} is longer than {contract.MAX_FILTER_BYTES} bytes")
            if not visible_text(value):
                raise BadRequestError(f"{name} {value!r} has no visible text")
        if self.category and not any(level.strip() for level in self.category.split(">")):
            raise BadRequestError(f"category {self.category!r} names no category")
        for name, value in (("min_price", self.min_price), ("max_price", self.max_price)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequestError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or not 0 <= value <= _FP32_MAX:
                raise BadRequestError(f"{name} must be a finite price >= 0, got {value!r}")
        low, high = self.min_price, self.max_price
        if low is not None and high is not None and low > high:
            raise BadRequestError(f"min_price {low} exceeds max_price {high}")
        if self.in_stock is not None and not isinstance(self.in_stock, bool):
            raise BadRequestError(f"in_stock must be True, False or None, got {self.in_stock!r}")

    def inputs(self, grpc_module, n: int) -> list:
        """InferInputs of the filters that are set, each [n, 1] (the same for every query)."""
        inputs = []

        def add(name: str, datatype: str, value) -> None:
            tensor = grpc_module.InferInput(name, [n, 1], datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)

        for name, text in (
            (contract.FILTER_CATEGORY, self.category),
            (contract.FILTER_BRAND, self.brand),
        ):
            if text:
                add(name, "BYTES", np.full((n, 1), text.encode("utf-8"), dtype=np.object_))
        for name, price in (
            (contract.FILTER_MIN_PRICE, self.min_price),
            (contract.FILTER_MAX_PRICE, self.max_price),
        ):
            if price is not None:
                add(name, "FP32", np.full((n, 1), price, dtype=np.float32))
        if self.in_stock:
            add(contract.FILTER_IN_STOCK, "BOOL", np.ones((n, 1), dtype=bool))
        return inputs


NO_FILTERS = Filters()


def chunks(queries: Sequence[str]) -> list[Sequence[str]]:
    """Splits a long list into requests of at most MAX_QUERIES_PER_REQUEST queries."""
    size = contract.MAX_QUERIES_PER_REQUEST
    return [queries[start : start + size] for start in range(0, len(queries), size)]


def build_inputs(
    grpc_module,
    queries: Sequence[str],
    k: int,
    filters: Filters = NO_FILTERS,
    user_id: str | None = None,
    explain: bool = False,
    rerank_depth: int | None = None,
) -> list:
    """InferInputs for one request (`grpc_module` is tritonclient.grpc or its aio variant);
    with `user_id`, a personalised search (the same shopper for every query); with `explain`,
    each hit's score explained; with `rerank_depth`, that many of the best candidates
    rescored by the cross-encoder (0: none; None: the server's default)."""
    query = grpc_module.InferInput(contract.QUERY, [len(queries), 1], "BYTES")
    query.set_data_from_numpy(np.array([[q.encode("utf-8")] for q in queries], dtype=np.object_))
    top_k = grpc_module.InferInput(contract.TOP_K, [len(queries), 1], "INT32")
    top_k.set_data_from_numpy(np.full((len(queries), 1), k, dtype=np.int32))
    inputs = [query, top_k, *filters.inputs(grpc_module, len(queries))]
    if user_id is not None:
        user = _one_string(user_id, "user_id", contract.MAX_USER_ID_BYTES, allow_empty=True)
        users = np.empty((len(queries), 1), dtype=np.object_)
        users[:, 0] = user
        inputs.append(_tensor(grpc_module, contract.USER_ID, users, "BYTES"))
    if not isinstance(explain, bool):
        raise BadRequestError(f"explain must be True or False, got {explain!r}")
    if explain:
        flags = np.ones((len(queries), 1), dtype=bool)
        inputs.append(_tensor(grpc_module, contract.EXPLAIN, flags, "BOOL"))
    if rerank_depth is not None:
        if (
            isinstance(rerank_depth, bool)
            or not isinstance(rerank_depth, int)
            or not 0 <= rerank_depth <= contract.MAX_RERANK_DEPTH
        ):
            raise BadRequestError(
                f"rerank_depth must be an integer from 0 to {contract.MAX_RERANK_DEPTH}, "
                f"got {rerank_depth!r}"
            )
        depths = np.full((len(queries), 1), rerank_depth, dtype=np.int32)
        inputs.append(_tensor(grpc_module, contract.RERANK_DEPTH, depths, "INT32"))
    return inputs


def build_outputs(grpc_module) -> list:
    return [grpc_module.InferRequestedOutput(name) for name in OUTPUTS]


def parse_hits(result) -> list[list[Hit]]:
    """One list of hits per query; empty ids (slots an approximate index left unfilled) skipped.
    Prices (NaN: no price) and stock are read when the server sent them."""
    ids, scores, titles = (result.as_numpy(name) for name in OUTPUTS)
    prices, in_stock = result.as_numpy(contract.PRICES), result.as_numpy(contract.IN_STOCK)
    explanations = result.as_numpy(contract.EXPLANATIONS)
    hits = []
    for row, (row_ids, row_scores, row_titles) in enumerate(zip(ids, scores, titles, strict=True)):
        row_hits = []
        for column, (product_id, score, title) in enumerate(
            zip(row_ids, row_scores, row_titles, strict=True)
        ):
            if not product_id:
                continue
            price = None if prices is None else float(prices[row, column])
            row_hits.append(
                Hit(
                    product_id.decode("utf-8"),
                    float(score),
                    title.decode("utf-8"),
                    price=None if price is None or math.isnan(price) else price,
                    in_stock=None if in_stock is None else bool(in_stock[row, column]),
                    explanation=_explanation(explanations, row, column),
                )
            )
        hits.append(row_hits)
    return hits


def _explanation(explanations: np.ndarray | None, row: int, column: int) -> dict | None:
    if explanations is None or not explanations[row, column]:
        return None
    return json.loads(explanations[row, column])


# --- Writes to the live catalog ------------------------------------------------------------------


def _write_size(values: Sequence, what: str) -> None:
    if isinstance(values, str | bytes | Mapping):
        raise BadRequestError(f"expected a sequence of {what}, got one {type(values).__name__}")
    if not values:
        raise BadRequestError(f"no {what} given")
    if len(values) > contract.MAX_PRODUCTS_PER_WRITE:
        # Not split here: a write is all or nothing, and several requests would not be.
        raise BadRequestError(
            f"{len(values)} {what} in one write; the maximum is "
            f"{contract.MAX_PRODUCTS_PER_WRITE} (send several writes, each all or nothing)"
        )


def _check_id(product_id: object, where: str) -> str:
    if not isinstance(product_id, str) or not product_id.strip():
        raise BadRequestError(f"{where}: the id must be a non-empty string, got {product_id!r}")
    if len(product_id.encode("utf-8")) > contract.MAX_PRODUCT_ID_BYTES:
        raise BadRequestError(
            f"{where}: the id is longer than {contract.MAX_PRODUCT_ID_BYTES} bytes"
        )
    return product_id


def encode_products(products: Sequence[Mapping]) -> list[bytes]:
    """Each product as compact UTF-8 JSON. Checked here: a JSON object with a string id, once
    per write, within the size limits; the server checks the rest (title, price, stock...)."""
    _write_size(products, "products")
    encoded, seen = [], set()
    for position, product in enumerate(products):
        if not isinstance(product, Mapping):
            raise BadRequestError(f"product {position} must be a mapping (a JSON object)")
        product_id = _check_id(product.get("id"), f"product {position}")
        if product_id in seen:
            raise BadRequestError(f"product {position}: id {product_id!r} appears twice")
        seen.add(product_id)
        try:
            text = json.dumps(
                dict(product), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as e:  # NaN and objects JSON cannot hold
            raise BadRequestError(f"product {position} ({product_id!r}) is not JSON: {e}") from None
        data = text.encode("utf-8")
        if len(data) > contract.MAX_PRODUCT_JSON_BYTES:
            raise BadRequestError(
                f"product {position} ({product_id!r}) is {len(data)} bytes of JSON; the maximum "
                f"is {contract.MAX_PRODUCT_JSON_BYTES}"
            )
        encoded.append(data)
    return encoded


def encode_ids(ids: Sequence[str]) -> list[bytes]:
    """Product ids to delete, UTF-8; repeats are fine."""
    _write_size(ids, "ids")
    return [
        _check_id(product_id, f"id {position}").encode("utf-8")
        for position, product_id in enumerate(ids)
    ]


def build_write_inputs(grpc_module, name: str, values: Sequence[bytes]) -> list:
    """The one input of a `catalog` request: `products` or `delete_ids`, BYTES [n]."""
    tensor = grpc_module.InferInput(name, [len(values)], "BYTES")
    array = np.empty(len(values), dtype=np.object_)
    array[:] = list(values)
    tensor.set_data_from_numpy(array)
    return [tensor]


def parse_ack(result) -> WriteAck:
    sequence_number, changed = (result.as_numpy(name) for name in WRITE_OUTPUTS)
    return WriteAck(sequence_number=int(sequence_number[0]), changed=int(changed[0]))


# --- Recommendations and shoppers' events ---------------------------------------------------------


def _one_string(value: object, name: str, limit_bytes: int, allow_empty: bool = False) -> bytes:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise BadRequestError(f"{name} must be a non-empty string, got {value!r}")
    data = value.encode("utf-8")
    if len(data) > limit_bytes:
        raise BadRequestError(f"{name} is longer than {limit_bytes} bytes")
    return data


def build_recommend_inputs(
    grpc_module,
    user_id: str,
    k: int,
    recent_product_ids: Sequence[str] = (),
    filters: Filters = NO_FILTERS,
) -> list:
    """InferInputs of one `recommend` query. An empty user id asks for the non-personal answer."""
    validate_k(k)
    user = _one_string(user_id, "user_id", contract.MAX_USER_ID_BYTES, allow_empty=True)
    if isinstance(recent_product_ids, str):
        raise BadRequestError("recent_product_ids must be a sequence of ids, got one string")
    if len(recent_product_ids) > contract.MAX_RECENT_PRODUCTS:
        raise BadRequestError(
            f"at most {contract.MAX_RECENT_PRODUCTS} recent products, got {len(recent_product_ids)}"
        )
    inputs = [
        _tensor(grpc_module, contract.USER_ID, np.array([[user]], dtype=np.object_), "BYTES"),
        _tensor(grpc_module, contract.TOP_K, np.full((1, 1), k, dtype=np.int32), "INT32"),
    ]
    if recent_product_ids:
        recent = np.empty((1, len(recent_product_ids)), dtype=np.object_)
        recent[0, :] = [
            _check_id(pid, f"recent product {i}").encode("utf-8")
            for i, pid in enumerate(recent_product_ids)
        ]
        inputs.append(_tensor(grpc_module, contract.RECENT_PRODUCT_IDS, recent, "BYTES"))
    return inputs + filters.inputs(grpc_module, 1)


def build_similar_inputs(
    grpc_module, product_id: str, k: int, filters: Filters = NO_FILTERS
) -> list:
    validate_k(k)
    product = _check_id(product_id, "product_id").encode("utf-8")
    return [
        _tensor(grpc_module, contract.PRODUCT_ID, np.array([[product]], dtype=np.object_), "BYTES"),
        _tensor(grpc_module, contract.TOP_K, np.full((1, 1), k, dtype=np.int32), "INT32"),
        *filters.inputs(grpc_module, 1),
    ]


def _tensor(grpc_module, name: str, value: np.ndarray, datatype: str):
    tensor = grpc_module.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def build_event_inputs(grpc_module, events: Sequence[ShopperEvent | Mapping]) -> list:
    """The inputs of one `events` write (all or nothing). Checked here: the shape of each event,
    the kinds and the sizes; the server checks that the products exist. Timestamps are sent
    when any event has one (the others get now, from this machine's clock)."""
    import time

    if isinstance(events, str | bytes | Mapping) or not events:
        raise BadRequestError("expected a non-empty sequence of events")
    if len(events) > contract.MAX_EVENTS_PER_WRITE:
        raise BadRequestError(
            f"{len(events)} events in one write; the maximum is {contract.MAX_EVENTS_PER_WRITE} "
            "(send several writes, each all or nothing)"
        )
    parsed = []
    for position, event in enumerate(events):
        if isinstance(event, Mapping):
            try:
                event = ShopperEvent(**event)
            except TypeError as e:
                raise BadRequestError(f"event {position}: {e}") from None
        if not isinstance(event, ShopperEvent):
            raise BadRequestError(f"event {position} must be a ShopperEvent or a mapping")
        if event.kind not in contract.EVENT_KINDS:
            raise BadRequestError(
                f"event {position}: kind must be one of {contract.EVENT_KINDS}, got {event.kind!r}"
            )
        quantity = event.quantity
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise BadRequestError(f"event {position}: quantity must be an integer")
        if not 1 <= quantity <= contract.MAX_EVENT_QUANTITY:
            raise BadRequestError(
                f"event {position}: quantity must be 1 to {contract.MAX_EVENT_QUANTITY}"
            )
        _one_string(event.user_id, f"event {position}: user_id", contract.MAX_USER_ID_BYTES)
        _check_id(event.product_id, f"event {position}")
        if event.timestamp_s is not None and not _is_timestamp(event.timestamp_s):
            raise BadRequestError(
                f"event {position}: timestamp_s must be finite seconds since the epoch (>= 0) "
                f"or None, got {event.timestamp_s!r}"
            )
        parsed.append(event)
    n = len(parsed)

    def strings(values: list[str]) -> np.ndarray:
        array = np.empty(n, dtype=np.object_)
        array[:] = [value.encode("utf-8") for value in values]
        return array

    columns = (
        (contract.EVENT_USER_IDS, [e.user_id for e in parsed]),
        (contract.EVENT_PRODUCT_IDS, [e.product_id for e in parsed]),
        (contract.EVENT_KINDS_INPUT, [e.kind for e in parsed]),
    )
    inputs = [_tensor(grpc_module, name, strings(values), "BYTES") for name, values in columns]
    quantities = np.array([e.quantity for e in parsed], dtype=np.int32)
    inputs.append(_tensor(grpc_module, contract.EVENT_QUANTITIES, quantities, "INT32"))
    if any(e.timestamp_s is not None for e in parsed):
        now = time.time()
        times = np.array(
            [now if e.timestamp_s is None else e.timestamp_s for e in parsed], dtype=np.float64
        )
        inputs.append(_tensor(grpc_module, contract.EVENT_TIMESTAMPS, times, "FP64"))
    return inputs


def _is_timestamp(value: object) -> bool:
    """The server's rule for a timestamp: a real number (not a bool), finite, >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # an int beyond any float
        return False


def parse_events_ack(result) -> EventsAck:
    sequence_number, recorded = (result.as_numpy(name) for name in EVENT_OUTPUTS)
    return EventsAck(sequence_number=int(sequence_number[0]), recorded=int(recorded[0]))


class SearchClientBase:
    """What the sync and asyncio clients share: address, deadline, model, requested outputs."""

    def __init__(
        self, url: str, timeout_s: float, model_name: str, client, write_key: str | None = None
    ) -> None:
        import tritonclient.grpc as grpcclient

        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._grpc = grpcclient
        self.url = url
        self.timeout_s = timeout_s
        self.model_name = model_name
        self._client = client
        # Sent with every write when given (a server with a write key refuses writes without).
        self._write_parameters = (
            {contract.WRITE_KEY_PARAMETER: write_key} if write_key is not None else None
        )
        # None asks for every output the server has: prices and stock where it has them, and
        # no error where it does not (naming an output the model lacks fails the request).
        self._outputs = None
        self._write_outputs = [grpcclient.InferRequestedOutput(name) for name in WRITE_OUTPUTS]
        self._event_outputs = [grpcclient.InferRequestedOutput(name) for name in EVENT_OUTPUTS]
