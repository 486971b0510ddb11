"""The `events` model (ecomsearch.serving.events) through the fake backend module, over a real
SQLite store: what is recorded, what is answered, and that a refused write records nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.serving.events import EventsModel
from ecomsearch.store import CatalogStore, EventLog, ProductWrite, open_store

DIMENSION = 4
ENCODER = "e" * 64
NOW = 1_700_000_000.0
PRODUCTS = ("sku-1", "sku-2", "sku-3", "gone")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CatalogStore]:
    """A SQLite store with products sku-1..3 live and `gone` deleted."""
    with open_store(f"sqlite://{tmp_path / 'catalog.sqlite3'}") as opened:
        vectors = np.random.default_rng(0).normal(size=(len(PRODUCTS), DIMENSION))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        opened.upsert(
            [ProductWrite(id=p, title=f"Product {p}") for p in PRODUCTS],
            vectors.astype(np.float32),
            ENCODER,
        )
        opened.delete(["gone"])
        yield opened


@pytest.fixture
def model(pb_utils, store) -> EventsModel:
    return EventsModel(pb_utils, store, clock=lambda: NOW)


def strings(*values: str | bytes) -> np.ndarray:
    """A BYTES [n] input as the backend hands it over: an object array of bytes."""
    array = np.empty(len(values), dtype=object)
    array[:] = [v if isinstance(v, bytes) else v.encode() for v in values]
    return array


def inputs(
    users=("u1",), products=("sku-1",), kinds=("view",), **extra: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        contract.EVENT_USER_IDS: strings(*users),
        contract.EVENT_PRODUCT_IDS: strings(*products),
        contract.EVENT_KINDS_INPUT: strings(*kinds),
        **extra,
    }


def record(triton, model, parameters: dict | None = None, **tensors: np.ndarray) -> Any:
    (response,) = model.execute([triton.request(parameters=parameters, **tensors)])
    return response


def ack(triton, response) -> tuple[int, int]:
    out = triton.outputs(response)
    assert set(out) == {contract.SEQUENCE_NUMBER, contract.RECORDED}
    for name, value in out.items():
        assert value.dtype == np.int64 and value.shape == (1,), name
    return int(out[contract.SEQUENCE_NUMBER][0]), int(out[contract.RECORDED][0])


def logged(store: CatalogStore) -> list[tuple[str, str, str, int, float]]:
    log: EventLog = store.events(0)
    return [
        (user, product, contract.EVENT_KINDS[kind], quantity, when)
        for user, product, kind, quantity, when in zip(
            log.user_ids,
            log.product_ids,
            log.kinds.tolist(),
            log.quantities.tolist(),
            log.timestamps_s.tolist(),
            strict=True,
        )
    ]


def assert_error(response, code: int, *fragments: str) -> str:
    assert response.has_error() and response.output_tensors() == []
    error = response.error()
    assert error.code() == code, error
    for fragment in fragments:
        assert fragment in error.message(), (fragment, error.message())
    return error.message()


# --- writes that succeed ----------------------------------------------------------------------


def test_a_write_records_its_events_in_order_and_answers_after_the_commit(triton, model, store):
    response = record(
        triton,
        model,
        **inputs(
            users=("u1", "u2", "u1"),
            products=("sku-1", "sku-2", "sku-2"),
            kinds=("view", "cart", "purchase"),
            **{
                contract.EVENT_QUANTITIES: np.array([1, 2, 3], dtype=np.int32),
                contract.EVENT_TIMESTAMPS: np.array([10.0, 20.5, 30.0], dtype=np.float64),
            },
        ),
    )

    assert ack(triton, response) == (3, 3)
    assert store.events_head() == 3
    assert logged(store) == [
        ("u1", "sku-1", "view", 1, 10.0),
        ("u2", "sku-2", "cart", 2, 20.5),
        ("u1", "sku-2", "purchase", 3, 30.0),
    ]
    keys = store.events(0).product_keys.tolist()
    stored = store.get(["sku-1", "sku-2"])
    assert keys == [stored["sku-1"].key, stored["sku-2"].key, stored["sku-2"].key]
    (message,) = triton.logged("VERBOSE")
    assert message.startswith("events: 3 recorded, seq 3, ") and message.endswith(" ms")


def test_the_sequence_number_counts_on_across_writes(triton, model, store):
    assert ack(triton, record(triton, model, **inputs())) == (1, 1)
    two = inputs(users=("u1", "u2"), products=("sku-3", "sku-3"), kinds=("view", "view"))
    assert ack(triton, record(triton, model, **two)) == (3, 2)
    assert store.events_head() == 3


def test_without_timestamps_and_quantities_the_clock_and_one_are_used(pb_utils, triton, store):
    times = iter([NOW, NOW + 60.0])
    model = EventsModel(pb_utils, store, clock=lambda: next(times))
    both = inputs(users=("u1", "u2"), products=("sku-1", "sku-2"), kinds=("view", "purchase"))

    ack(triton, record(triton, model, **both))
    ack(triton, record(triton, model, **inputs(products=("sku-3",))))

    assert logged(store) == [
        ("u1", "sku-1", "view", 1, NOW),
        ("u2", "sku-2", "purchase", 1, NOW),
        ("u1", "sku-3", "view", 1, NOW + 60.0),
    ]


def test_given_timestamps_are_kept_and_the_clock_is_not_used_for_them(triton, model, store):
    old = NOW - 86_400.0
    tensors = inputs(**{contract.EVENT_TIMESTAMPS: np.array([old], dtype=np.float64)})
    ack(triton, record(triton, model, **tensors))
    assert logged(store) == [("u1", "sku-1", "view", 1, old)]


def test_the_largest_write_is_accepted(triton, model, store):
    n = contract.MAX_EVENTS_PER_WRITE
    tensors = inputs(users=[f"u{i}" for i in range(n)], products=["sku-2"] * n, kinds=["cart"] * n)
    assert ack(triton, record(triton, model, **tensors)) == (n, n)
    assert len(store.events(0)) == n


# --- writes that are refused, whole ---------------------------------------------------------------

MAX = contract.MAX_EVENTS_PER_WRITE
BAD_WRITES = [
    pytest.param(
        {contract.EVENT_USER_IDS: None}, [f"{contract.EVENT_USER_IDS!r} is required"], id="no-users"
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: None},
        [f"{contract.EVENT_PRODUCT_IDS!r} is required"],
        id="no-products",
    ),
    pytest.param(
        {contract.EVENT_KINDS_INPUT: None},
        [f"{contract.EVENT_KINDS_INPUT!r} is required"],
        id="no-kinds",
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: strings("sku-1")},
        [f"{contract.EVENT_PRODUCT_IDS!r} has 1 values for 2 events"],
        id="fewer-products",
    ),
    pytest.param(
        {contract.EVENT_KINDS_INPUT: strings("view", "view", "view")},
        [f"{contract.EVENT_KINDS_INPUT!r} has 3 values for 2 events"],
        id="more-kinds",
    ),
    pytest.param(
        {contract.EVENT_USER_IDS: strings("u1", "u2").reshape(2, 1)},
        ["shape [n]"],
        id="users-2d",
    ),
    pytest.param(
        {contract.EVENT_QUANTITIES: np.array([1, 1, 1], dtype=np.int32)},
        [f"{contract.EVENT_QUANTITIES!r} must have shape [2]"],
        id="quantities-too-many",
    ),
    pytest.param(
        {contract.EVENT_TIMESTAMPS: np.full((2, 1), NOW)},
        [f"{contract.EVENT_TIMESTAMPS!r} must have shape [2]"],
        id="timestamps-2d",
    ),
    pytest.param(
        {contract.EVENT_KINDS_INPUT: strings("view", "like")},
        ["event 1", "'like'", "is not one of"],
        id="bad-kind",
    ),
    pytest.param(
        {contract.EVENT_QUANTITIES: np.array([1, 0], dtype=np.int32)},
        ["event 1", "quantity 0"],
        id="quantity-0",
    ),
    pytest.param(
        {contract.EVENT_QUANTITIES: np.array([1, -2], dtype=np.int32)},
        ["event 1", "quantity -2"],
        id="quantity-negative",
    ),
    pytest.param(
        {contract.EVENT_QUANTITIES: np.array([1.0, 2.0], dtype=np.float32)},
        ["event 0", "quantity must be an int"],
        id="quantity-float",
    ),
    pytest.param(
        {contract.EVENT_TIMESTAMPS: np.array([NOW, np.nan])},
        ["event 1", "timestamp_s nan"],
        id="timestamp-nan",
    ),
    pytest.param(
        {contract.EVENT_TIMESTAMPS: np.array([np.inf, NOW])},
        ["event 0", "finite"],
        id="timestamp-inf",
    ),
    pytest.param(
        {contract.EVENT_TIMESTAMPS: np.array([NOW, -1.0])},
        ["event 1", ">= 0"],
        id="timestamp-negative",
    ),
    pytest.param(
        {contract.EVENT_USER_IDS: strings("u1", b"\xff\xfe")},
        [f"{contract.EVENT_USER_IDS}[1] is not valid UTF-8"],
        id="user-not-utf8",
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: strings(b"sku-\xc3", "sku-2")},
        [f"{contract.EVENT_PRODUCT_IDS}[0] is not valid UTF-8"],
        id="product-not-utf8",
    ),
    pytest.param(
        {contract.EVENT_USER_IDS: strings("u1", "")},
        ["event 1", "user_id must be a non-empty string"],
        id="empty-user",
    ),
    pytest.param(
        {contract.EVENT_USER_IDS: strings("\u200b ", "u2")},
        ["event 0", "no visible characters"],
        id="invisible-user",
    ),
    pytest.param(
        {contract.EVENT_USER_IDS: strings("u1", "x" * (contract.MAX_USER_ID_BYTES + 1))},
        ["event 1", f"the maximum is {contract.MAX_USER_ID_BYTES}"],
        id="user-too-long",
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: strings("sku-1", "")},
        ["event 1", "product_id must be a non-empty string"],
        id="empty-product",
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: strings("sku-1", "nope")},
        ["no live product 'nope'"],
        id="unknown-product",
    ),
    pytest.param(
        {contract.EVENT_PRODUCT_IDS: strings("gone", "sku-1")},
        ["no live product 'gone'"],
        id="deleted-product",
    ),
    pytest.param(
        {
            name: strings(*[value] * (MAX + 1))
            for name, value in (
                (contract.EVENT_USER_IDS, "u1"),
                (contract.EVENT_PRODUCT_IDS, "sku-1"),
                (contract.EVENT_KINDS_INPUT, "view"),
            )
        },
        [f"{MAX + 1} events in one write", f"1 to {MAX}"],
        id="too-many-events",
    ),
    pytest.param(
        {name: strings() for name in (contract.EVENT_USER_IDS, contract.EVENT_PRODUCT_IDS)}
        | {contract.EVENT_KINDS_INPUT: strings()},
        ["0 events in one write"],
        id="no-events",
    ),
]


@pytest.mark.parametrize(("changes", "fragments"), BAD_WRITES)
def test_a_bad_write_is_invalid_and_records_nothing(triton, model, store, changes, fragments):
    tensors = inputs(users=("u1", "u2"), products=("sku-1", "sku-2"), kinds=("view", "purchase"))
    tensors.update(changes)
    tensors = {name: value for name, value in tensors.items() if value is not None}

    response = record(triton, model, **tensors)

    message = triton.assert_invalid_arg(response, "nothing was written", *fragments)
    assert "Traceback" not in message
    assert store.events_head() == 0 and len(store.events(0)) == 0


def test_many_unknown_products_are_named_up_to_five(triton, model, store):
    unknown = [f"x{i}" for i in range(7)]
    tensors = inputs(users=["u1"] * 8, products=["sku-1", *unknown], kinds=["view"] * 8)
    message = triton.assert_invalid_arg(record(triton, model, **tensors), "and 2 more")
    assert all(f"'x{i}'" in message for i in range(5)) and "'x5'" not in message
    assert store.events_head() == 0


def test_a_bad_request_fails_alone_and_the_others_of_the_execute_are_written(triton, model, store):
    responses = model.execute(
        [
            triton.request(**inputs(users=("a",), products=("sku-1",))),
            triton.request(
                **inputs(users=("b", "b"), products=("sku-2", "nope"), kinds=("view",) * 2)
            ),
            triton.request(**inputs(users=("c",), products=("sku-3",), kinds=("purchase",))),
            triton.request(**inputs(kinds=("like",))),
            triton.request(**inputs(users=("d",), products=("sku-2",), kinds=("cart",))),
        ]
    )

    assert len(responses) == 5
    assert ack(triton, responses[0]) == (1, 1)
    triton.assert_invalid_arg(responses[1], "nothing was written", "'nope'")
    assert ack(triton, responses[2]) == (2, 1)
    triton.assert_invalid_arg(responses[3], "nothing was written", "'like'")
    assert ack(triton, responses[4]) == (3, 1)
    assert [(user, product) for user, product, *_ in logged(store)] == [
        ("a", "sku-1"),
        ("c", "sku-3"),
        ("d", "sku-2"),
    ]


# --- the write key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters",
    [None, {}, {contract.WRITE_KEY_PARAMETER: "wrong"}, {contract.WRITE_KEY_PARAMETER: 7}],
    ids=["no-parameters", "no-key", "wrong-key", "not-a-string"],
)
def test_with_a_write_key_a_write_without_it_is_refused_and_records_nothing(
    pb_utils, triton, store, parameters
):
    model = EventsModel(pb_utils, store, write_key="s3cret", clock=lambda: NOW)

    refused, allowed = model.execute(
        [
            triton.request(parameters=parameters, **inputs(users=("intruder",))),
            triton.request(
                parameters={contract.WRITE_KEY_PARAMETER: "s3cret"}, **inputs(users=("owner",))
            ),
        ]
    )

    message = triton.assert_invalid_arg(refused, contract.WRITE_KEY_PARAMETER, "write key")
    assert "s3cret" not in message
    assert ack(triton, allowed) == (1, 1)
    assert [user for user, *_ in logged(store)] == ["owner"]


def test_a_write_key_is_checked_before_the_events(pb_utils, triton, store):
    """A caller without the key learns nothing about the catalog (e.g. which products exist)."""
    model = EventsModel(pb_utils, store, write_key="s3cret", clock=lambda: NOW)
    response = record(triton, model, **inputs(products=("nope",)))
    message = triton.assert_invalid_arg(response, "write key")
    assert "nope" not in message
    assert store.events_head() == 0


# --- no store, and a failing store -----------------------------------------------------------


def test_without_a_store_every_write_is_unsupported(pb_utils, triton):
    model = EventsModel(pb_utils, None, write_key="s3cret", clock=lambda: NOW)
    responses = model.execute(
        [
            triton.request(**inputs()),
            triton.request(parameters={contract.WRITE_KEY_PARAMETER: "s3cret"}, **inputs()),
            triton.request(**inputs(kinds=("like",))),
        ]
    )
    for response in responses:
        assert_error(response, pb_utils.TritonError.UNSUPPORTED, "records no events")
    model.close()  # nothing to close: no error


def test_a_store_failure_is_internal_with_an_id_and_the_model_keeps_serving(
    pb_utils, triton, model, store, monkeypatch
):
    def fail(events):
        raise RuntimeError("catalog store sqlite:///secret/path.sqlite3: disk I/O error")

    monkeypatch.setattr(store, "record_events", fail)

    message = assert_error(record(triton, model, **inputs()), pb_utils.TritonError.INTERNAL)

    assert "internal error" in message and "retrying the same write is safe" in message
    assert "disk I/O error" not in message and "secret" not in message
    assert "Traceback" not in message
    error_id = message.split("internal error ")[1].split(",")[0].rstrip(")")
    assert len(error_id) == 12
    (logged_error,) = triton.logged("ERROR")
    assert error_id in logged_error and "Traceback" in logged_error
    assert "disk I/O error" in logged_error
    monkeypatch.undo()
    assert ack(triton, record(triton, model, **inputs())) == (1, 1)
