"""ecomsearch.loadtest.dashboard: the checked-in dashboard drawn by `dashboard-snapshot` from a
Prometheus's range queries (a fake one here; tests/integration/test_operations.py evaluates
the same queries on a real Prometheus)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ecomsearch.loadtest.dashboard import draw, legend
from tests import monitoring


class RangeQueries:
    """Answers every range query with one series per model, rising over the run, and
    records the queries."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list:
        self.queries.append(expr)
        if "nv_gpu" in expr:
            return []  # a CPU server has no GPU series
        times = [start_s + i * step_s for i in range(int((end_s - start_s) / step_s) + 1)]
        return [
            {
                "metric": {"model": model, "instance": "10.0.0.1:8002"},
                "values": [[t, str(n * (i + 1))] for i, t in enumerate(times)],
            }
            for n, model in enumerate(("preprocess", "retrieve"), start=1)
        ]


def test_every_panel_is_drawn_and_every_query_asked(tmp_path: Path) -> None:
    prometheus = RangeQueries()
    png = tmp_path / "dashboard.png"

    table = draw(prometheus, monitoring.load_dashboard(), 1000.0, 1060.0, png, [("load", 1010.0)])

    expressions = [expr for _, expr in monitoring.dashboard_expressions(rate_interval="10s")]
    assert prometheus.queries == expressions
    assert [(title, expr) for title, expr, _ in table] == monitoring.dashboard_expressions("10s")
    assert png.stat().st_size > 50_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last: dict[str, Any] = {expr: values for _, expr, values in table}
    gpu = [values for expr, values in last.items() if "nv_gpu" in expr]
    assert gpu and all(values == "(no data)" for values in gpu)
    # The last point of each series, named as the panel's legend format names it.
    search_by_model = next(v for e, v in last.items() if "sum by (model)" in e)
    assert "preprocess=31" in search_by_model and "retrieve=62" in search_by_model


@pytest.mark.parametrize(
    ("legend_format", "expected"),
    [
        ("{{model}} {{reason}}", "select invalid_argument"),
        ("p99 {{ instance }}", "p99 10.0.0.1:8002"),
        ("", "instance=10.0.0.1:8002, model=select, reason=invalid_argument"),
    ],
)
def test_legends_name_series_as_grafana_does(legend_format: str, expected: str) -> None:
    labels = {
        "__name__": "x",
        "job": "ecomsearch",
        "model": "select",
        "reason": "invalid_argument",
        "instance": "10.0.0.1:8002",
    }
    assert legend(legend_format, labels) == expected
