"""The Python models' custom metrics (ecomsearch.serving.metrics) against the fake backend's
MetricFamily, which keeps what was published: the label sets, the counting per batch, the
rejection reasons, the catalog gauges and their refresh limit."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from ecomsearch.ranking.features import FEATURE_COUNT, FEATURE_NAMES
from ecomsearch.serving.base import BatchedModel, RequestError, Tensors
from ecomsearch.serving.metrics import (
    APPLIED_SEQ,
    CANDIDATES,
    EMPTY_RESULTS,
    INDEX_PRODUCTS,
    MODEL_METRICS,
    QUERIES,
    REQUESTS_REJECTED,
    ModelMetrics,
    timestamp_of,
)
from ecomsearch.serving.retrieve import candidate_sources

ARGS = {"model_name": "retrieve", "model_version": "1", "model_instance_name": "retrieve_0"}
INSTANCE = {"model": "retrieve", "version": "1", "model_instance": "retrieve_0"}


def value(pb_utils, name: str, **labels: str) -> float:
    return pb_utils.MetricFamily.registry[name].value(**labels)


def test_every_series_carries_the_instance_labels(pb_utils) -> None:
    metrics = ModelMetrics.of_instance(pb_utils, ARGS)

    metrics.increment(QUERIES, 3)
    metrics.increment(QUERIES, 2)
    metrics.increment(CANDIDATES, 7, source="vector")
    metrics.set(INDEX_PRODUCTS, 12)
    metrics.set(INDEX_PRODUCTS, 11)

    assert value(pb_utils, QUERIES.name, **INSTANCE) == 5
    assert value(pb_utils, CANDIDATES.name, **INSTANCE, source="vector") == 7
    assert value(pb_utils, INDEX_PRODUCTS.name, **INSTANCE) == 11
    family = pb_utils.MetricFamily.registry[QUERIES.name]
    assert family.kind == pb_utils.MetricFamily.COUNTER
    assert pb_utils.MetricFamily.registry[INDEX_PRODUCTS.name].kind == pb_utils.MetricFamily.GAUGE


def test_a_series_needs_exactly_its_labels(pb_utils) -> None:
    metrics = ModelMetrics.of_instance(pb_utils, ARGS)
    with pytest.raises(ValueError, match="source"):
        metrics.increment(CANDIDATES, 1)
    with pytest.raises(ValueError, match="labels"):
        metrics.increment(QUERIES, 1, source="vector")


def test_names_follow_prometheus_conventions() -> None:
    for spec in MODEL_METRICS:
        assert spec.name.startswith("ecomsearch_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert "model" not in spec.labels and "instance" not in spec.labels


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("INVALID_ARG", "invalid_argument"),
        ("INTERNAL", "internal"),
        ("UNAVAILABLE", "unavailable"),
        ("UNSUPPORTED", "unsupported"),
        ("NOT_FOUND", "not_found"),
    ],
)
def test_rejections_count_by_the_reason_of_their_code(pb_utils, code: str, reason: str) -> None:
    metrics = ModelMetrics.of_instance(pb_utils, ARGS)
    metrics.rejected(getattr(pb_utils.TritonError, code))
    assert value(pb_utils, REQUESTS_REJECTED.name, **INSTANCE, reason=reason) == 1


def test_disabled_metrics_publish_nothing(pb_utils) -> None:
    metrics = ModelMetrics.disabled()
    metrics.increment(QUERIES, 1)
    metrics.set(APPLIED_SEQ, 3)
    metrics.rejected(pb_utils.TritonError.INTERNAL)
    assert pb_utils.MetricFamily.registry == {}


def test_a_zero_increment_sends_nothing(pb_utils) -> None:
    ModelMetrics.of_instance(pb_utils, ARGS).increment(EMPTY_RESULTS, 0)
    assert EMPTY_RESULTS.name not in pb_utils.MetricFamily.registry


def test_declared_series_exist_at_zero_before_their_first_event(pb_utils) -> None:
    from ecomsearch.serving.metrics import rejections

    ModelMetrics.of_instance(pb_utils, ARGS).declare([*rejections("internal"), (QUERIES, {})])
    assert value(pb_utils, REQUESTS_REJECTED.name, **INSTANCE, reason="internal") == 0
    assert value(pb_utils, QUERIES.name, **INSTANCE) == 0
    with pytest.raises(KeyError):
        value(pb_utils, REQUESTS_REJECTED.name, **INSTANCE, reason="invalid_argument")


def test_counts_are_sent_together_by_the_sender_and_on_close(
    pb_utils, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomsearch.serving import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "SEND_INTERVAL_S", 0.05)
    sent: list[float] = []
    metrics = ModelMetrics.of_instance(pb_utils, ARGS).declare([(QUERIES, {})])
    series = metrics.metric(QUERIES)
    real_increment = series.increment
    monkeypatch.setattr(series, "increment", lambda v: (sent.append(v), real_increment(v)))

    for _ in range(5):
        metrics.count(QUERIES, 2)
    assert value(pb_utils, QUERIES.name, **INSTANCE) in (0, 10)  # the sender may be quick
    deadline = time.monotonic() + 5
    while value(pb_utils, QUERIES.name, **INSTANCE) != 10:
        assert time.monotonic() < deadline, "the sender never sent the counts"
        time.sleep(0.01)
    assert sum(sent) == 10 and len(sent) < 5, "counts are sent added up, not one by one"
    metrics.count(QUERIES, 3)
    metrics.close()  # the sender stops, and what was pending is sent
    assert value(pb_utils, QUERIES.name, **INSTANCE) == 13


def test_watched_gauges_are_set_at_once_then_by_the_sender(
    pb_utils, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomsearch.serving import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "SEND_INTERVAL_S", 0.05)
    state = {INDEX_PRODUCTS: 5.0, APPLIED_SEQ: None}
    metrics = ModelMetrics.of_instance(pb_utils, ARGS)

    metrics.watch(lambda: dict(state))

    assert value(pb_utils, INDEX_PRODUCTS.name, **INSTANCE) == 5
    assert APPLIED_SEQ.name not in pb_utils.MetricFamily.registry, "None: nothing known yet"
    state.update({INDEX_PRODUCTS: 7.0, APPLIED_SEQ: 42.0})
    deadline = time.monotonic() + 5
    while APPLIED_SEQ.name not in pb_utils.MetricFamily.registry:
        assert time.monotonic() < deadline, "the sender never set the watched gauges"
        time.sleep(0.01)
    time.sleep(0.1)  # both gauges of that round are set
    assert value(pb_utils, INDEX_PRODUCTS.name, **INSTANCE) == 7
    assert value(pb_utils, APPLIED_SEQ.name, **INSTANCE) == 42
    metrics.close()


def test_timestamps_of_manifest_times() -> None:
    assert timestamp_of("2026-11-30T07:20:22+00:00") == 1796023222.0
    assert timestamp_of("2026-11-30T07:20:22Z") == 1796023222.0
    assert timestamp_of(None) is None
    assert timestamp_of("yesterday") is None


def features_of(vector_ranks: list[list[int]], lexical_ranks: list[list[int]]) -> np.ndarray:
    features = np.zeros((*np.shape(vector_ranks), FEATURE_COUNT), dtype=np.float32)
    features[..., FEATURE_NAMES.index("vector_rank")] = np.log1p(vector_ranks)
    features[..., FEATURE_NAMES.index("lexical_rank")] = np.log1p(lexical_ranks)
    return features


def test_candidate_sources_count_each_list_and_the_empty_queries() -> None:
    pool = 3  # rank 3 = not in that list
    rows = np.array([[5, 6, 7, -1], [-1, -1, -1, -1], [8, 9, -1, -1]])
    features = features_of(
        [[0, 1, 3, 3], [3, 3, 3, 3], [2, 3, 3, 3]],
        [[3, 0, 1, 3], [3, 3, 3, 3], [0, 1, 3, 3]],
    )
    vector, lexical, empty = candidate_sources(rows, features, pool, pool)
    assert (vector, lexical, empty) == (3, 4, 1)


class Doubler(BatchedModel):
    """Doubles `x`; a negative value is a bad request, a zero a bug."""

    def parse(self, request) -> Tensors:
        x = self.pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
        if (x < 0).any():
            raise RequestError("x must not be negative")
        return {"x": x}

    def run(self, inputs: Tensors) -> Tensors:
        if (inputs["x"] == 0).any():
            raise ZeroDivisionError("a bug")
        return {"y": inputs["x"] * 2}


def test_error_answers_count_as_rejections_by_reason(pb_utils, triton) -> None:
    model = Doubler(pb_utils).instrumented(ARGS)
    requests: list[Any] = [
        triton.request(x=np.array([[1.0]], dtype=np.float32)),
        triton.request(x=np.array([[-1.0]], dtype=np.float32)),
        triton.request(x=np.array([[0.0]], dtype=np.float32)),
        triton.request(x=np.array([[-2.0]], dtype=np.float32)),
    ]
    responses = model.execute(requests)
    assert [r.has_error() for r in responses] == [False, True, True, True]
    assert value(pb_utils, REQUESTS_REJECTED.name, **INSTANCE, reason="invalid_argument") == 2
    assert value(pb_utils, REQUESTS_REJECTED.name, **INSTANCE, reason="internal") == 1
