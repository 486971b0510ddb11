"""The Python models' own Prometheus metrics, beside Triton's (`pb_utils.MetricFamily`).

Triton publishes them on its metrics port with its own (`nv_*`), and the launcher relays both
(ecomsearch.server.ops). Every series carries `model`, `version` and `model_instance`: each
model instance is a process of its own, and one series per instance keeps gauges from
overwriting each other (sum or max them by `model` in queries).

Updating a metric is a message from the stub to the Triton process and a wait for its answer:
about 37 us of a model's time, measured with a probe model on tritonserver 2.51 here (four a
batch added 140 us to each request). So one background thread per instance sends, once per
SEND_INTERVAL_S, what the model counted on every batch (`count`, added up in the process) and
the gauges it watches (`watch`); only the rare events (a rejected request: `increment`) are sent
at once. Nothing is sent on a search's path.

The names here are the contract with deploy/monitoring (the dashboard and the alert rules);
tests/unit/test_monitoring_rules.py checks that the two agree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

COUNTER = "counter"
GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    description: str
    # Label names beyond model, version and model_instance.
    labels: tuple[str, ...] = ()


REQUESTS_REJECTED = MetricSpec(
    "ecomsearch_requests_rejected_total",
    COUNTER,
    "Requests a Python model answered with an error, by reason (invalid_argument: a bad "
    "request; internal: a bug one request triggered; unavailable: work shed; unauthenticated: "
    "a write without the write key; unsupported: a write to a server without a store)",
    ("reason",),
)
QUERIES = MetricSpec("ecomsearch_queries_total", COUNTER, "Queries searched by retrieve")
CANDIDATES = MetricSpec(
    "ecomsearch_candidates_total",
    COUNTER,
    "Candidates retrieve found, by source (vector: FAISS, lexical: BM25); a candidate both "
    "found counts in both",
    ("source",),
)
EMPTY_RESULTS = MetricSpec(
    "ecomsearch_empty_results_total",
    COUNTER,
    "Queries answered with nothing: no candidate (retrieve), no product (select)",
)
INDEX_PRODUCTS = MetricSpec(
    "ecomsearch_index_products", GAUGE, "Products searchable now: base index + delta - deleted"
)
INDEX_BUILT = MetricSpec(
    "ecomsearch_index_built_timestamp_seconds",
    GAUGE,
    "Unix time the served base index was built (its age: time() - this)",
)
DELTA_ROWS = MetricSpec(
    "ecomsearch_catalog_delta_rows",
    GAUGE,
    "Rows in the live delta: catalog changes since the base index, until a compaction",
)
APPLIED_SEQ = MetricSpec(
    "ecomsearch_catalog_applied_seq",
    GAUGE,
    "The sequence number of the last catalog change this instance applied",
)
CAUGHT_UP = MetricSpec(
    "ecomsearch_catalog_caught_up_timestamp_seconds",
    GAUGE,
    "Unix time at which this instance had last read every change the catalog store held; the "
    "catalog lag is the scrape's time minus this: timestamp(x) - x",
)

MODEL_METRICS = (
    REQUESTS_REJECTED,
    QUERIES,
    CANDIDATES,
    EMPTY_RESULTS,
    INDEX_PRODUCTS,
    INDEX_BUILT,
    DELTA_ROWS,
    APPLIED_SEQ,
    CAUGHT_UP,
)
# The launcher's own (ecomsearch.server.ops), without model labels.
SERVER_LIVE = "ecomsearch_server_live"
SERVER_READY = "ecomsearch_server_ready"
METRIC_NAMES = frozenset({spec.name for spec in MODEL_METRICS} | {SERVER_LIVE, SERVER_READY})

# How often the counts and the watched gauges are sent: well under a scrape interval, and the
# catalog lag's resolution (its alert fires at seconds).
SEND_INTERVAL_S = 1.0

# Rejection reasons by TritonError code name; the code's own name otherwise.
_REASONS = {
    "INVALID_ARG": "invalid_argument",
    "INTERNAL": "internal",
    "UNAVAILABLE": "unavailable",
    "UNSUPPORTED": "unsupported",
}
UNAUTHENTICATED = "unauthenticated"


def rejections(*reasons: str) -> list[tuple[MetricSpec, dict[str, str]]]:
    """The rejection series of these reasons (for ModelMetrics.declare)."""
    return [(REQUESTS_REJECTED, {"reason": reason}) for reason in reasons]


class ModelMetrics:
    """One model instance's metrics; `ModelMetrics.disabled()` for a model built outside a
    server (unit tests, the in-process pipeline), where every update does nothing."""

    def __init__(self, pb_utils: Any, labels: dict[str, str] | None) -> None:
        self.pb_utils = pb_utils
        self.labels = labels
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._lock = threading.Lock()  # the follower's thread and the model's share them
        # `count`'s sums not sent yet, by series; the gauges' readers; the thread that sends.
        self._pending: dict[tuple[MetricSpec, tuple[tuple[str, str], ...]], float] = {}
        self._pending_lock = threading.Lock()
        self._watched: list[Callable[[], dict[MetricSpec, float | None]]] = []
        self._sender: threading.Thread | None = None
        self._closed = threading.Event()

    @classmethod
    def of_instance(cls, pb_utils: Any, args: dict[str, Any]) -> ModelMetrics:
        """The metrics of the model instance Triton's `initialize(args)` describes."""
        return cls(
            pb_utils,
            {
                "model": str(args["model_name"]),
                "version": str(args["model_version"]),
                "model_instance": str(args["model_instance_name"]),
            },
        )

    @classmethod
    def disabled(cls) -> ModelMetrics:
        return cls(None, None)

    @property
    def enabled(self) -> bool:
        return self.labels is not None

    @staticmethod
    def _labels_key(spec: MetricSpec, labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
        if sorted(labels) != sorted(spec.labels):
            raise ValueError(f"{spec.name} takes the labels {spec.labels}, got {sorted(labels)}")
        return tuple(sorted(labels.items()))

    def metric(self, spec: MetricSpec, **labels: str) -> Any:
        """The series of `spec` with these extra labels (created on first use)."""
        key = (spec.name, self._labels_key(spec, labels))
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                family = self._families.get(spec.name)
                if family is None:
                    family_type = self.pb_utils.MetricFamily
                    kind = family_type.COUNTER if spec.kind == COUNTER else family_type.GAUGE
                    family = family_type(name=spec.name, description=spec.description, kind=kind)
                    self._families[spec.name] = family
                metric = family.Metric(labels={**self.labels, **labels})
                self._metrics[key] = metric
        return metric

    def declare(self, series: Iterable[tuple[MetricSpec, dict[str, str]]]) -> ModelMetrics:
        """Creates these series now, at 0: a counter that first appears at its first increment
        has no earlier sample, so rate() over it misses that first event."""
        if self.enabled:
            for spec, labels in series:
                self.metric(spec, **labels)
        return self

    def increment(self, spec: MetricSpec, value: float = 1, **labels: str) -> None:
        """Adds `value` to a counter now (for rare events; per batch, use `count`)."""
        if self.enabled and value:
            self.metric(spec, **labels).increment(float(value))

    def count(self, spec: MetricSpec, value: float = 1, **labels: str) -> None:
        """Adds `value` to a counter within SEND_INTERVAL_S (by the sender thread), costing the
        caller no message to Triton."""
        if not self.enabled or not value:
            return
        key = (spec, self._labels_key(spec, labels))
        with self._pending_lock:
            self._pending[key] = self._pending.get(key, 0.0) + value
        self._start_sender()

    def watch(self, read: Callable[[], dict[MetricSpec, float | None]]) -> None:
        """Sets the gauges `read()` returns now, then every SEND_INTERVAL_S (by the sender
        thread: a stuck model thread does not stop them, so a lag computed from a timestamp
        gauge keeps growing)."""
        if not self.enabled:
            return
        self.set_all(read())
        self._watched.append(read)
        self._start_sender()

    def _start_sender(self) -> None:
        with self._pending_lock:
            if self._sender is None and not self._closed.is_set():
                self._sender = threading.Thread(
                    target=self._send_every, name="metrics-sender", daemon=True
                )
                self._sender.start()

    def flush(self) -> None:
        """Sends what `count` has added up, and the watched gauges."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for (spec, labels), value in pending.items():
            self.metric(spec, **dict(labels)).increment(float(value))
        for read in self._watched:
            self.set_all(read())

    def _send_every(self) -> None:
        while not self._closed.wait(SEND_INTERVAL_S):
            try:
                self.flush()
            except Exception:  # a metric is not worth a model: try again next time
                continue

    def set(self, spec: MetricSpec, value: float, **labels: str) -> None:
        if self.enabled:
            self.metric(spec, **labels).set(float(value))

    def rejected(self, code: int, reason: str | None = None) -> None:
        """One request answered with the TritonError `code`, counted by `reason` (by default
        the code's)."""
        if self.enabled:
            self.increment(REQUESTS_REJECTED, reason=reason or self.reason_of(code))

    def reason_of(self, code: int) -> str:
        error_type = self.pb_utils.TritonError
        for name, reason in _REASONS.items():
            if getattr(error_type, name) == code:
                return reason
        names = {
            getattr(error_type, name): name.lower() for name in dir(error_type) if name.isupper()
        }
        return names.get(code, "unknown")

    def set_all(self, values: dict[MetricSpec, float | None]) -> None:
        """Sets each gauge to its value; None leaves one as it is (nothing known yet)."""
        for spec, value in values.items():
            if value is not None:
                self.set(spec, value)

    def close(self) -> None:
        """Sends what is pending, stops the sender, and drops the series (the stub wants a
        family deleted after its metrics)."""
        self._closed.set()
        if self._sender is not None:
            self._sender.join(5)
        if self.enabled:
            self.flush()
        self._watched.clear()
        with self._lock:
            self._metrics.clear()
            self._families.clear()


def timestamp_of(iso: str | None) -> float | None:
    """Unix time of an ISO 8601 time (a manifest's `built_at`), None when absent or unreadable."""
    if not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp()
