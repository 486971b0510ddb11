"""The Grafana dashboard (deploy/monitoring/grafana-dashboard.json) without Grafana: its panels
and PromQL as Grafana would send them, and `ecomsearch dashboard-snapshot`, which draws every
panel from data a real Prometheus scraped off a live server under a scripted load.

The snapshot is how this project shows the dashboard where no Grafana runs (its CI machines):
tritonserver over the model repository, a Prometheus scraping it every second, then phases of
load (idle, one searcher, four, sixteen with catalog writes and bad requests, idle again), then
each panel's queries over the whole run (`query_range`) drawn with matplotlib, one chart per
panel, in the dashboard's order, plus a table of each query's last value.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RATE_INTERVAL_VARIABLE = "__rate_interval"
# A panel with more series than this leaves out those that stayed at 0 (or had no value).
MAX_FLAT_SERIES = 6
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _walk_panels(panels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        # A collapsed row keeps its panels inside it.
        yield from _walk_panels(panel.get("panels", ()))


def dashboard_panels(dashboard: dict[str, Any], rows: bool = False) -> list[dict[str, Any]]:
    """Every panel of the dashboard, those inside collapsed rows too, in order; the rows
    themselves (type "row", no query) only when `rows`."""
    return [
        panel
        for panel in _walk_panels(dashboard.get("panels", ()))
        if rows or panel.get("type") != "row"
    ]


def substitute_variables(expr: str, rate_interval: str = "1m") -> str:
    """`expr` as Grafana sends it to Prometheus: `$__rate_interval` (or `${__rate_interval}`)
    replaced by `rate_interval`. Any other variable raises ValueError: the dashboard's
    expressions must stand on their own."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name == RATE_INTERVAL_VARIABLE:
            return rate_interval
        raise ValueError(f"unknown Grafana variable {match.group(0)!r} in {expr!r}")

    return _VARIABLE.sub(replace, expr)


def dashboard_expressions(
    dashboard: dict[str, Any], rate_interval: str = "1m"
) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel, with Grafana's
    variables substituted (`rate_interval`: what `$__rate_interval` becomes; Grafana makes it at
    least four scrape intervals). A panel with several queries gives several pairs."""
    pairs = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", ()):
            if target.get("expr"):
                pairs.append((panel["title"], substitute_variables(target["expr"], rate_interval)))
    return pairs


def legend(legend_format: str | None, labels: dict[str, str]) -> str:
    """A series' name as Grafana's legend format makes it (`{{model}} {{reason}}`); its labels
    when there is no format, or the format names none of them."""
    if legend_format:
        named = _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), legend_format).strip()
        if named:
            return named
    shown = {k: v for k, v in labels.items() if k not in ("__name__", "job")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "value"


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class LoadPhase:
    name: str
    seconds: float
    searchers: int  # concurrent searchers, each one request at a time
    writes_per_s: float = 0.0  # catalog upserts of one product
    bad_requests_per_s: float = 0.0  # searches the server refuses (INVALID_ARG)


PHASES = (
    LoadPhase("idle", 15, 0),
    LoadPhase("1 searcher", 30, 1),
    LoadPhase("4 searchers", 30, 4),
    LoadPhase("16 searchers, writes, bad requests", 40, 16, writes_per_s=5, bad_requests_per_s=1),
    LoadPhase("idle", 20, 0),
)


def _drive(
    url: str,
    phase: LoadPhase,
    queries: Sequence[str],
    write_key: str | None,
    written: list[int],
) -> dict:
    """Runs one phase against the server at `url`; returns what was sent and what failed."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from ecomsearch import contract
    from ecomsearch.client import SearchClient

    stop = threading.Event()
    counts = {"searches": 0, "search_errors": 0, "writes": 0, "bad_requests": 0}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def searcher(offset: int) -> None:
        with SearchClient(url) as client:
            n = offset
            while not stop.is_set():
                try:
                    client.search(queries[n % len(queries)], k=10)
                    count("searches")
                except Exception:  # counted: the panels show what the server saw
                    count("search_errors")
                n += 1

    def paced(rate_per_s: float, action) -> None:
        while not stop.wait(1 / rate_per_s):
            action()

    # One client each for the writer and the sender of bad requests, each used by its thread.
    writer = SearchClient(url, write_key=write_key)
    raw = grpcclient.InferenceServerClient(url)
    # Past the client's own checks, as any gRPC caller can send it.
    bad_query = grpcclient.InferInput(contract.QUERY, [1, 1], "BYTES")
    bad_query.set_data_from_numpy(np.array([["x" * (contract.MAX_QUERY_BYTES + 1)]], dtype=object))

    def write() -> None:
        written[0] += 1
        writer.upsert_products(
            [{"id": f"snapshot-{written[0]}", "title": f"Snapshot cable {written[0]}"}]
        )
        count("writes")

    def bad_request() -> None:
        try:
            raw.infer(contract.SEARCH_MODEL, [bad_query])
        except Exception:
            count("bad_requests")

    threads = [threading.Thread(target=searcher, args=(i * 7,)) for i in range(phase.searchers)]
    if phase.writes_per_s:
        threads.append(threading.Thread(target=paced, args=(phase.writes_per_s, write)))
    if phase.bad_requests_per_s:
        threads.append(threading.Thread(target=paced, args=(phase.bad_requests_per_s, bad_request)))
    for thread in threads:
        thread.start()
    stop.wait(phase.seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    writer.close()
    raw.close()
    return counts


def draw(
    prometheus: Any,
    dashboard: dict[str, Any],
    start_s: float,
    end_s: float,
    out_png: Path,
    phases: Sequence[tuple[str, float]] = (),
    step_s: float = 2.0,
    rate_interval: str = "10s",
) -> list[tuple[str, str, str]]:
    """Draws every panel over [start_s, end_s] into `out_png`; returns (panel, query, last
    values) rows. `phases`: (name, start time) marks drawn on every chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard_panels(dashboard)
    columns = 4
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.4 * rows), squeeze=False)
    table: list[tuple[str, str, str]] = []
    for axis, panel in zip(axes.flat, panels, strict=False):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        axis.set_title(panel["title"], fontsize=10)
        drawn = hidden = 0
        for target in panel.get("targets", ()):
            expr = substitute_variables(target["expr"], rate_interval)
            last = []
            result = prometheus.query_range(expr, start_s, end_s, step_s)
            for series in result:
                times = [float(t) - start_s for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                name = legend(target.get("legendFormat"), series["metric"])
                last.append(f"{name}={values[-1]:.4g}")
                # Many idle models' flat zeros would only repeat the colour cycle.
                if len(result) > MAX_FLAT_SERIES and all(v == 0 or v != v for v in values):
                    hidden += 1
                    continue
                axis.plot(times, values, label=name, linewidth=1.2)
                drawn += 1
            table.append((panel["title"], expr, ", ".join(last) or "(no data)"))
        for _, phase_start_s in phases:
            axis.axvline(phase_start_s - start_s, color="grey", linewidth=0.6, linestyle=":")
        axis.set_xlabel("seconds into the run", fontsize=8)
        axis.set_ylabel(unit, fontsize=8)
        axis.tick_params(labelsize=7)
        if drawn:
            title = f"{hidden} series at 0 not drawn" if hidden else None
            axis.legend(fontsize=6, loc="upper left", title=title, title_fontsize=6)
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    title = dashboard.get("title", "dashboard")
    marks = "; ".join(f"{name} at {t - start_s:.0f} s" for name, t in phases)
    figure.suptitle(f"{title}, drawn from Prometheus data (phases: {marks})", fontsize=12)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=80)
    plt.close(figure)
    return table


def run_snapshot(
    model_repository: Path,
    dashboard_path: Path,
    out_dir: Path,
    queries: Sequence[str],
    phases: Sequence[LoadPhase] = PHASES,
    rule_files: Sequence[Path] = (),
) -> Path:
    """Serves `model_repository`, scrapes it, drives `phases` of load, draws the dashboard;
    returns the PNG's path (beside it: panels.md, the queries and their last values)."""
    import secrets

    from ecomsearch.loadtest.prometheus import PrometheusServer
    from ecomsearch.server.launcher import TritonServer

    dashboard = load_dashboard(dashboard_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_key = secrets.token_urlsafe(16)
    with TritonServer.local(
        model_repository, out_dir / "tritonserver.log", write_key=write_key
    ) as server:
        target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with PrometheusServer([target], rule_files) as prometheus:
            started = time.time()
            marks, sent, written = [], [], [0]
            for phase in phases:
                marks.append((phase.name, time.time()))
                log.info("dashboard-snapshot: %s for %.0f s", phase.name, phase.seconds)
                counts = _drive(server.grpc_url, phase, queries, write_key, written)
                sent.append((phase.name, counts))
            # The run's products go again: the store is the workspace's, used by other runs.
            if written[0]:
                from ecomsearch.client import SearchClient

                with SearchClient(server.grpc_url, write_key=write_key) as client:
                    client.delete_products([f"snapshot-{n}" for n in range(1, written[0] + 1)])
            time.sleep(3 * prometheus.scrape_interval_s)
            png = out_dir / "dashboard.png"
            table = draw(prometheus, dashboard, started, time.time(), png, marks)
            alerts = [
                (rule["name"], alert["state"])
                for group in prometheus.api("rules")["groups"]
                for rule in group["rules"]
                for alert in rule.get("alerts", [])
            ]
    lines = [
        f"# {dashboard.get('title', 'dashboard')}: panels at the end of the run",
        "",
        "| phase | sent |",
        "|---|---|",
        *(f"| {name} | {counts} |" for name, counts in sent),
        "",
        f"Alerts active at the end: {alerts or 'none'}",
        "",
        "| panel | query | last values |",
        "|---|---|---|",
        *(f"| {title} | `{' '.join(expr.split())}` | {values} |" for title, expr, values in table),
    ]
    (out_dir / "panels.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return png
