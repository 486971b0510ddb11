"""Several replicas as one service, watched by a real Prometheus: the single-machine stand-in
for the Deployment's replicas (deploy/kubernetes, docs/operations.md).

Two `ecomsearch serve` processes, on ports of their own, each over its own model repository
whose index was built from one shared PostgreSQL catalog store (what each pod's init step
does), started as the Deployment starts them (the store URL and the write key from the
environment, as a Secret gives them). A Prometheus scrapes both every second and evaluates the
alert rules of deploy/monitoring. The tests check that a write through one replica is searchable
through the other within the catalog's visibility window, that every dashboard panel and alert
expression evaluates on the live data, and that stopping one replica leaves the other serving.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ecomsearch import contract
from ecomsearch.client import SearchClient
from ecomsearch.index.builder import build_index
from ecomsearch.live.location import STORE_URL_ENV, WRITE_KEY_ENV
from ecomsearch.loadtest.prometheus import JOB, SCRAPE_INTERVAL_S, PrometheusServer
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.server.launcher import ServerPorts, signal_group
from ecomsearch.server.processes import group_members
from ecomsearch.store import open_store
from tests import monitoring
from tests.integration.conftest import copy_model_repository, wait_ready

# The live catalog's promise (docs/live-catalog.md): a write acknowledged by any server is
# searchable on every server within a second.
VISIBILITY_WINDOW_S = 1.0
WRITE_KEY = "operations-write-key"
STOP_TIMEOUT_S = 60.0


@dataclass
class Replica:
    name: str
    repository: Path
    ports: ServerPorts
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def target(self) -> str:
        """Its metrics and health port, as Prometheus scrapes it."""
        return f"127.0.0.1:{self.ports.metrics}"

    def start(self, store_url: str) -> None:
        # The pod's environment: the store and the write key come from the Secret.
        env = {**os.environ, STORE_URL_ENV: store_url, WRITE_KEY_ENV: WRITE_KEY}
        command = [
            *(sys.executable, "-m", "ecomsearch.cli", "serve"),
            f"--model-repository={self.repository}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--http-port={self.ports.http}",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it takes every child
            )

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; then nothing of its process group may remain."""
        process, self.process = self.process, None
        if process is None:
            return
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            deadline = time.monotonic() + 10
            while (left := alive_in_group(process.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if left:
                signal_group(process.pid, signal.SIGKILL)
            assert not left, f"{self.name} left processes behind: {left}"


def alive_in_group(pgid: int) -> list[int]:
    return [member.pid for member in group_members(pgid) if member.alive]


@dataclass
class Service:
    store_url: str
    replicas: list[Replica]
    prometheus: PrometheusServer


@pytest.fixture(scope="module")
def service(
    postgres_server, tmp_path_factory, fixture_catalog, embedding_cache
) -> Iterator[Service]:
    store_url = postgres_server.create_database()
    base = tmp_path_factory.mktemp("replicas")
    replicas = []
    taken: tuple[int, ...] = ()
    for name in ("replica-a", "replica-b"):
        # Each pod's init step: its own copy of the repository, its index built from the
        # shared store (the first loads the catalog file into it; the next finds it there).
        repository = copy_model_repository(base / name)
        build_index(
            fixture_catalog,
            ModelRepositoryLayout(repository),
            cache_dir=embedding_cache,
            store_url=store_url,
        )
        ports = ServerPorts.free()
        while set(taken) & {ports.http, ports.grpc, ports.metrics}:
            ports = ServerPorts.free()
        taken += (ports.http, ports.grpc, ports.metrics)
        replicas.append(Replica(name, repository, ports, base / f"{name}.log"))
    try:
        for replica in replicas:  # both load at once, as a Deployment's pods do
            replica.start(store_url)
        for replica in replicas:
            assert replica.process is not None
            try:
                wait_ready(replica.ports.metrics, replica.process)
            except AssertionError:
                raise AssertionError(replica.log_path.read_text()[-4000:]) from None
        prometheus = PrometheusServer(
            [replica.target for replica in replicas], [monitoring.ALERTS_PATH]
        ).start()
        try:
            yield Service(store_url, replicas, prometheus)
        finally:
            prometheus.stop()
    finally:
        for replica in replicas:
            replica.stop()


def search_ids(url: str, query: str, k: int = 5) -> list[str]:
    with SearchClient(url) as client:
        return [hit.product_id for hit in client.search(query, k=k)]


def seconds_until_visible(url: str, query: str, product_id: str, timeout_s: float = 10.0) -> float:
    started = time.monotonic()
    with SearchClient(url) as client:
        while time.monotonic() - started < timeout_s:
            if product_id in [hit.product_id for hit in client.search(query, k=3)]:
                return time.monotonic() - started
            time.sleep(0.02)
    return float("inf")


def test_a_write_through_one_replica_is_searchable_through_the_other_within_the_window(
    service: Service,
) -> None:
    first, second = service.replicas
    for writer, reader, word in ((first, second, "zyxquad"), (second, first, "zyxquint")):
        product_id = f"replicas-{word}"
        with SearchClient(writer.grpc_url, write_key=WRITE_KEY) as client:
            client.upsert_products([{"id": product_id, "title": f"{word} cable", "price": 3.0}])
        seconds = seconds_until_visible(reader.grpc_url, word, product_id)
        print(f"written through {writer.name}: searchable through {reader.name} in {seconds:.3f} s")
        assert seconds <= VISIBILITY_WINDOW_S, (
            f"written through {writer.name}, searchable through {reader.name} after {seconds:.3f} s"
        )
    # A delete through one is gone from both.
    with SearchClient(second.grpc_url, write_key=WRITE_KEY) as client:
        client.delete_products(["replicas-zyxquad"])
    time.sleep(VISIBILITY_WINDOW_S)
    for replica in service.replicas:
        assert "replicas-zyxquad" not in search_ids(replica.grpc_url, "zyxquad")


def send_bad_search(url: str) -> None:
    """A search the server must refuse (a query over MAX_QUERY_BYTES), sent past the client's
    own checks with tritonclient, as any gRPC caller can."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    query = grpcclient.InferInput(contract.QUERY, [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([["x" * (contract.MAX_QUERY_BYTES + 1)]], dtype=object))
    with (
        grpcclient.InferenceServerClient(url) as client,
        pytest.raises(InferenceServerException, match="INVALID_ARG"),
    ):
        client.infer(contract.SEARCH_MODEL, [query])


def drive_traffic(service: Service) -> None:
    """Searches on both replicas, a bad request and a write: every panel has data to show."""
    for replica in service.replicas:
        with SearchClient(replica.grpc_url) as client:
            for query in ("quiet case fan", "1tb nvme ssd", "ddr5 memory", "zzqqxxjj"):
                client.search(query, k=10)
        send_bad_search(replica.grpc_url)
    with SearchClient(service.replicas[0].grpc_url, write_key=WRITE_KEY) as client:
        client.upsert_products([{"id": "replicas-metrics", "title": "Zyxmetric hub"}])


def test_both_replicas_publish_the_same_catalog_state(service: Service) -> None:
    drive_traffic(service)
    with open_store(service.store_url) as store:
        head = store.head()
    prometheus = service.prometheus
    # Every retrieve and select instance of both replicas has applied the store's last change,
    # as the gauges say (refreshed once a second, scraped every second).
    applied = f'ecomsearch_catalog_applied_seq{{job="{JOB}"}} == {head}'
    deadline = time.monotonic() + 15
    while len(prometheus.query(applied)) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    series = prometheus.values(f'ecomsearch_catalog_applied_seq{{job="{JOB}"}}')
    assert sorted(dict(labels)["model"] for labels in series) == [
        "retrieve",
        "retrieve",
        "select",
        "select",
    ]
    assert set(series.values()) == {head}, series
    # As the dashboard and CatalogLagHigh read it: the scrape's time minus the caught-up time.
    caught_up = f'ecomsearch_catalog_caught_up_timestamp_seconds{{job="{JOB}"}}'
    lag = prometheus.values(f"timestamp({caught_up}) - {caught_up}")
    assert len(lag) == 4 and max(lag.values()) < 5, lag
    products = prometheus.values('sum by (instance) (ecomsearch_index_products{model="retrieve"})')
    assert len(set(products.values())) == 1, f"the replicas serve different catalogs: {products}"


def test_every_dashboard_panel_and_alert_evaluates_on_live_data(service: Service) -> None:
    prometheus = service.prometheus
    drive_traffic(service)
    # Searches go on while the panels are read, so that every rate window holds some.
    stop = threading.Event()

    def search_steadily(url: str) -> None:
        with SearchClient(url) as client:
            while not stop.wait(0.05):
                client.search("quiet case fan", k=10)

    searchers = [
        threading.Thread(target=search_steadily, args=(replica.grpc_url,))
        for replica in service.replicas
    ]
    for searcher in searchers:
        searcher.start()
    try:
        prometheus.wait_for('rate(nv_inference_request_success{model="search"}[15s]) > 0')
        time.sleep(4 * SCRAPE_INTERVAL_S)  # a few scrapes of the steady traffic
        failed, empty, shown = [], [], []
        for title, expression in monitoring.dashboard_expressions(rate_interval="15s"):
            try:
                result = prometheus.query(expression)
            except Exception as e:  # every failure is reported, not only the first
                failed.append(f"{title}: {expression}: {e}")
                continue
            (empty if not result else shown).append((title, expression, result))
    finally:
        stop.set()
        for searcher in searchers:
            searcher.join(30)
    assert not failed, "\n".join(failed)
    for title, expression, result in shown:
        values = ", ".join(
            f"{ {k: v for k, v in series['metric'].items() if k not in ('job', '__name__')} }"
            f"={float(series['value'][1]):.4g}"
            for series in result[:4]
        )
        print(f"{title} | {' '.join(expression.split())} | {values}")
    # Panels that must show numbers (a finite value, not only NaN) on a CPU server serving
    # searches; GPU panels, for one, are empty here.
    finite = " / ".join(
        title
        for title, _, result in shown
        if any(math.isfinite(float(series["value"][1])) for series in result)
    ).lower()
    for needed in ("throughput", "latency", "queue", "batch", "candidates", "lag", "ready"):
        assert needed in finite, f"no panel about {needed!r} shows a number: {finite}"
    throughput = prometheus.values(
        f'sum(rate(nv_inference_request_success{{job="{JOB}", model="search"}}[15s]))'
    )
    assert next(iter(throughput.values())) > 1, throughput

    for rule in monitoring.alert_rules():
        prometheus.query(rule["expr"])  # raises on an expression Prometheus refuses
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules if rule["type"] == "alerting"} == {
        rule["alert"] for rule in monitoring.alert_rules()
    }
    assert all(rule["health"] == "ok" for rule in rules), [
        (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
    ]
    # Two healthy replicas: nothing fires, nothing is pending.
    active = [
        (rule["name"], alert["labels"], alert["state"])
        for rule in rules
        for alert in rule.get("alerts", [])
    ]
    assert not active, active


def test_the_autoscalers_metric_is_computed_per_replica_from_live_data(service: Service) -> None:
    """The Prometheus adapter's rule (deploy/kubernetes/prometheus-adapter) that the HPA scales
    on, with its templates filled as the adapter fills them for a pod (the pod's label matchers,
    grouped by pod; here by scrape target): one finite value per replica."""
    import yaml

    from tests.project import PROJECT_ROOT

    configmap = yaml.safe_load(
        (PROJECT_ROOT / "deploy/kubernetes/prometheus-adapter/configmap.yaml").read_text()
    )
    (rule,) = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    query = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        .replace("<<.GroupBy>>", "instance")
    )
    assert "<<" not in query, query
    drive_traffic(service)
    time.sleep(3 * SCRAPE_INTERVAL_S)
    values = service.prometheus.values(query)
    assert sorted(dict(labels)["instance"] for labels in values) == sorted(
        replica.target for replica in service.replicas
    )
    for microseconds in values.values():
        # Finite and plausible: a search on this machine waits well under a second in queues.
        assert 0 <= microseconds < 1_000_000, values


def test_a_failed_search_counts_twice_in_tritons_failures(service: Service) -> None:
    """Triton 2.51 counts a failed ensemble request twice in nv_inference_request_failure (once
    when the error is sent, once when the request is released); the dashboard and the
    SearchErrorRateHigh alert halve it. A Triton that fixes this fails here: halve no more."""
    replica = service.replicas[1]
    where = f'job="{JOB}", instance="{replica.target}"'
    failures = f'sum(nv_inference_request_failure{{{where}, model="search"}})'
    rejected = (
        f'sum(ecomsearch_requests_rejected_total{{{where}, model="preprocess", '
        'reason="invalid_argument"})'
    )

    def scraped() -> tuple[float, float]:
        # Two scrape intervals: every sample taken after the requests has been scraped.
        time.sleep(2 * SCRAPE_INTERVAL_S + 0.5)
        return tuple(
            float(service.prometheus.query(expression)[0]["value"][1])
            for expression in (failures, rejected)
        )

    failed_before, rejected_before = scraped()
    for _ in range(3):
        send_bad_search(replica.grpc_url)
    failed_after, rejected_after = scraped()
    assert rejected_after - rejected_before == 3, "preprocess rejected each request once"
    assert failed_after - failed_before == 6, "Triton counts each failed search twice"


def test_stopping_one_replica_leaves_the_other_serving(service: Service) -> None:
    first, second = service.replicas
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def search_the_survivor() -> None:
        nonlocal answered
        with SearchClient(second.grpc_url) as client:
            while not stop.is_set():
                try:
                    if client.search("quiet case fan", k=5):
                        answered += 1
                except Exception as e:
                    failures.append(f"{type(e).__name__}: {e}")

    searcher = threading.Thread(target=search_the_survivor)
    searcher.start()
    try:
        time.sleep(0.5)
        first.stop()  # asserts that nothing of its process group is left
        time.sleep(1.0)
    finally:
        stop.set()
        searcher.join(30)
    assert not failures, failures[:5]
    assert answered > 0
    # Writes go on through the survivor, and Prometheus sees exactly one replica down (what
    # the ServerDown alert waits on, before its `for`).
    with SearchClient(second.grpc_url, write_key=WRITE_KEY) as client:
        client.upsert_products([{"id": "replicas-survivor", "title": "Zyxsurvivor hub"}])
    assert seconds_until_visible(second.grpc_url, "zyxsurvivor", "replicas-survivor") <= (
        VISIBILITY_WINDOW_S
    )
    down = service.prometheus.wait_for(f'up{{job="{JOB}"}} == 0', timeout_s=15)
    assert [series["metric"]["instance"] for series in down] == [first.target]
    ready = service.prometheus.values(f'ecomsearch_server_ready{{job="{JOB}"}}')
    assert list(ready.values()) == [1.0] and dict(next(iter(ready)))["instance"] == second.target
