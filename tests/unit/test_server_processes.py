"""The launcher's process plumbing without a tritonserver: /proc parsing, the reaper, the
stub watchdog and the ops endpoint."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ecomsearch.server import watchdog as watchdog_module
from ecomsearch.server.ops import OpsEndpoint
from ecomsearch.server.processes import (
    SHM_DIR,
    Process,
    StubInstance,
    group_members,
    remove_shm_regions,
    shm_regions,
)
from ecomsearch.server.watchdog import StubWatchdog


def region_name() -> str:
    return f"triton_python_backend_shm_region_{uuid.uuid4()}"


def stub_argv(model: str, instance: str, region: str) -> tuple[str, ...]:
    # As tritonserver 2.51's Python backend starts a stub (seen with `ps`).
    return (
        "/tmp/backends/python/triton_python_backend_stub",
        f"/models/{model}/1/model.py",
        region,
        "1048576",
        "1048576",
        "4242",
        "/tmp/backends/python",
        "336",
        instance,
        "DEFAULT",
    )


def test_a_stub_is_read_from_its_arguments() -> None:
    region = region_name()
    stub = StubInstance.from_process(Process(7, "S", stub_argv("retrieve", "retrieve_0_1", region)))
    assert stub == StubInstance(7, "retrieve", "retrieve_0_1", region, alive=True)
    assert StubInstance.from_process(Process(8, "S", ("/usr/bin/python3", "x.py"))) is None
    zombie = StubInstance.from_process(Process(9, "Z", stub_argv("select", "select_0_0", region)))
    assert zombie is not None and not zombie.alive


def test_only_triton_region_names_are_collected_and_removed(tmp_path: Path) -> None:
    region = region_name()
    members = [Process(1, "S", stub_argv("preprocess", "preprocess_0_0", region))]
    assert shm_regions(members) == {region}
    (SHM_DIR / region).write_bytes(b"x")
    try:
        # Not a Triton region name: never touched, even if asked.
        assert remove_shm_regions([region, "not_a_triton_region", "../etc"]) == [region]
        assert not (SHM_DIR / region).exists()
        assert remove_shm_regions([region]) == []  # already gone is fine
    finally:
        (SHM_DIR / region).unlink(missing_ok=True)


def fake_server_group(regions: list[str]) -> subprocess.Popen:
    """A process group standing in for tritonserver and a stub: a sleeping shell (the group
    leader) and its child, whose arguments name the regions as a stub's do."""
    sleeper = f"{sys.executable} -c 'import time; time.sleep(300)'"
    script = f"{sleeper} {' '.join(regions)} & wait"
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)


def wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("owner_dies", [True, False], ids=["owner-killed", "group-stopped"])
def test_the_reaper_cleans_up_after_the_group(tmp_path: Path, owner_dies: bool) -> None:
    regions = [region_name(), region_name()]
    for region in regions:
        (SHM_DIR / region).write_bytes(b"x")
    scratch = tmp_path / "backends"
    scratch.mkdir()
    owner = subprocess.Popen(["sleep", "300"])
    group = fake_server_group(regions)
    reaper = None
    try:
        assert wait_for(lambda: shm_regions(group_members(group.pid)) == set(regions))
        reaper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ecomsearch.server.reaper",
                f"--group={group.pid}",
                f"--owner={owner.pid}",
                f"--remove={scratch}",
                "--poll-interval-s=0.1",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        assert reaper.poll() is None and (SHM_DIR / regions[0]).exists()  # nothing yet
        if owner_dies:
            owner.kill()
        else:
            os.killpg(group.pid, signal.SIGKILL)
        _, stderr = reaper.communicate(timeout=15)
        group.wait(timeout=5)
        assert reaper.returncode == 0
        assert not any(p.alive for p in group_members(group.pid))
        assert not any((SHM_DIR / r).exists() for r in regions), stderr
        assert not scratch.exists()
        assert "removed 2 shared-memory regions" in stderr
    finally:
        for process in (owner, group, reaper):
            if process is not None and process.poll() is None:
                process.kill()
        for region in regions:
            (SHM_DIR / region).unlink(missing_ok=True)


class FakeGroup:
    """Stands in for /proc: the watchdog sees the stubs listed in `live`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, live: list[StubInstance]) -> None:
        self.live = live
        monkeypatch.setattr(watchdog_module, "group_members", lambda group: [])
        monkeypatch.setattr(watchdog_module, "stubs", lambda members: list(self.live))


def stub(pid: int, model: str, instance: str) -> StubInstance:
    return StubInstance(pid, model, instance, region_name(), alive=True)


def test_the_watchdog_reloads_the_model_whose_stub_died(monkeypatch) -> None:
    group = FakeGroup(
        monkeypatch, [stub(10, "retrieve", "retrieve_0_0"), stub(11, "select", "select_0_0")]
    )
    seen_while_reloading = []

    def reload_model(model: str) -> None:
        seen_while_reloading.append((model, watchdog.healthy))
        group.live = [stub(11, "select", "select_0_0"), stub(20, "retrieve", "retrieve_0_0")]

    watchdog = StubWatchdog(1, reload_model, poll_interval_s=0.02)
    watchdog.start()
    try:
        time.sleep(0.1)
        assert watchdog.healthy and seen_while_reloading == []
        group.live = [stub(11, "select", "select_0_0")]  # retrieve's stub is gone
        assert wait_for(lambda: watchdog.restarts, timeout_s=5)
        assert seen_while_reloading == [("retrieve", False)]  # not ready while replacing
        assert watchdog.healthy
        time.sleep(0.1)
        assert len(seen_while_reloading) == 1  # the new stub (pid 20) is the expected one now
    finally:
        watchdog.stop()
        watchdog.join(timeout=5)


def test_a_model_that_cannot_be_reloaded_fails_the_server(monkeypatch) -> None:
    group = FakeGroup(monkeypatch, [stub(10, "preprocess", "preprocess_0_0")])
    attempts = []

    def reload_model(model: str) -> None:
        attempts.append(model)
        raise RuntimeError("load failed")

    monkeypatch.setattr(watchdog_module.threading.Event, "wait", fast_wait(), raising=True)
    watchdog = StubWatchdog(1, reload_model, poll_interval_s=0.02, max_reload_attempts=2)
    watchdog.start()
    try:
        time.sleep(0.05)
        group.live = []
        assert wait_for(lambda: watchdog.failed is not None, timeout_s=5)
        assert attempts == ["preprocess", "preprocess"]
        assert "preprocess" in watchdog.failed and not watchdog.healthy
    finally:
        watchdog.stop()
        watchdog.join(timeout=5)


def fast_wait():
    """threading.Event.wait with the backoff between reload attempts cut to 10 ms."""
    original = threading.Event.wait

    def wait(self, timeout=None):
        return original(self, None if timeout is None else min(timeout, 0.01))

    return wait


class FakeMetrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"nv_inference_count 42\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def ops():
    metrics = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    state = {"ready": (True, "ready")}
    endpoint = OpsEndpoint(
        "127.0.0.1",
        0,
        f"http://127.0.0.1:{metrics.server_address[1]}/metrics",
        live=lambda: (True, "live"),
        ready=lambda: state["ready"],
    ).start()
    yield endpoint, state
    endpoint.close()
    metrics.shutdown()
    metrics.server_close()


def get(port: int, path: str, method: str = "GET", body: bytes | None = None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def metric_values(body: bytes) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_ops_endpoint_relays_metrics_and_reports_health(ops) -> None:
    endpoint, state = ops
    status, body = get(endpoint.port, "/metrics")
    assert status == 200
    assert body.startswith(b"nv_inference_count 42\n")
    assert metric_values(body) == {
        "nv_inference_count": 42,
        "ecomsearch_server_live": 1,
        "ecomsearch_server_ready": 1,
    }
    assert get(endpoint.port, "/v2/health/live")[0] == 200
    assert get(endpoint.port, "/v2/health/ready")[0] == 200
    state["ready"] = (False, "a model instance died and is being replaced")
    assert get(endpoint.port, "/v2/health/ready") == (
        503,
        b"a model instance died and is being replaced\n",
    )
    assert get(endpoint.port, "/v2/repository/index")[0] == 404
    assert metric_values(get(endpoint.port, "/metrics")[1])["ecomsearch_server_ready"] == 0


def test_without_tritonserver_metrics_the_launcher_still_reports_not_ready() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    endpoint = OpsEndpoint(
        "127.0.0.1",
        0,
        f"http://127.0.0.1:{dead_port}/metrics",
        live=lambda: (False, "tritonserver is not running"),
        ready=lambda: (False, "tritonserver is not running"),
    ).start()
    try:
        status, body = get(endpoint.port, "/metrics")
    finally:
        endpoint.close()
    assert status == 200
    assert metric_values(body) == {"ecomsearch_server_live": 0, "ecomsearch_server_ready": 0}


def test_ops_endpoint_refuses_bodies_and_other_methods_unread(ops) -> None:
    endpoint, _ = ops
    # The body that crashes tritonserver 2.51's HTTP servers: 4 MiB, form-urlencoded.
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as s:
        size = 4 << 20
        s.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"a" * size)  # may be refused before all of it is sent
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    assert get(endpoint.port, "/metrics", method="POST", body=b"{}")[0] == 405
    assert get(endpoint.port, "/metrics")[0] == 200  # still serving


def flags(command: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for argument in command[1:]:
        name, _, value = argument.partition("=")
        found.setdefault(name, []).append(value)
    return found


def test_the_default_server_command_is_locked_down(tmp_path: Path) -> None:
    from ecomsearch.server.launcher import ADMIN_PROTOCOLS, ServerPorts, TritonServer

    server = TritonServer(tmp_path, ServerPorts(http=1, grpc=2, metrics=3))
    command = flags(server.command(tmp_path / "backends", Path("/bin/tritonserver")))
    assert command["--grpc-address"] == ["127.0.0.1"]  # loopback unless asked
    assert command["--allow-http"] == ["false"] and "--http-address" not in command
    # tritonserver's own metrics port: loopback, and not the public one (the ops endpoint's).
    assert command["--metrics-address"] == ["127.0.0.1"] and command["--metrics-port"] != ["3"]
    assert command["--metrics-config"] == ["summary_latencies=true"]  # the p99 panels and alert
    (restricted,) = command["--grpc-restricted-protocol"]
    protocols, _, key = restricted.partition(":")
    assert set(protocols.split(",")) == set(ADMIN_PROTOCOLS)
    assert key == f"admin-key={server.admin_key}" and len(server.admin_key) >= 24
    assert command["--model-control-mode"] == ["explicit"] and command["--load-model"] == ["*"]
    assert TritonServer(tmp_path).admin_key != server.admin_key  # random per server


def test_http_when_asked_is_loopback_only_and_restricted_too(tmp_path: Path) -> None:
    from ecomsearch.server.launcher import ServerPorts, TritonServer

    server = TritonServer(
        tmp_path,
        ServerPorts(http=1, grpc=2, metrics=3),
        bind_address="0.0.0.0",
        http=True,
        admin_key="k",
    )
    command = flags(server.command(None, Path("/bin/tritonserver")))
    assert command["--grpc-address"] == ["0.0.0.0"]
    assert command["--allow-http"] == ["true"] and command["--http-address"] == ["127.0.0.1"]
    assert command["--http-restricted-api"][0].endswith(":admin-key=k")
    assert "--backend-directory" not in command  # a system installation finds its own
    assert server.admin_headers == {"triton-grpc-protocol-admin-key": "k"}


def test_the_private_metrics_port_is_never_a_public_one(monkeypatch, tmp_path: Path) -> None:
    from ecomsearch.server import launcher
    from ecomsearch.server.launcher import ServerPorts, TritonServer

    # free_port() hands out the ports picked for the public ones first, as it can when they
    # are not bound yet (a CI run failed this way: gRPC and metrics on one port).
    offers = iter([2, 3, 1, 4])
    monkeypatch.setattr(launcher, "free_port", lambda host="127.0.0.1": next(offers))
    server = TritonServer(tmp_path, ServerPorts(http=1, grpc=2, metrics=3))
    command = flags(server.command(None, Path("/bin/tritonserver")))
    assert command["--metrics-port"] == ["4"]


def test_listening_ports_come_from_outside_the_ephemeral_range() -> None:
    from ecomsearch.server.launcher import ServerPorts, ephemeral_port_range, free_port

    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(50)] + list(vars(ServerPorts.free()).values())
    assert all(not low <= port <= high for port in ports), (low, high, ports)
    assert len(set(vars(ServerPorts.free()).values())) == 3


def test_the_response_cache_is_asked_for_with_its_size_and_library(tmp_path: Path) -> None:
    from ecomsearch.server.launcher import ServerPorts, TritonServer

    plain = TritonServer(tmp_path, ServerPorts(http=1, grpc=2, metrics=3))
    assert "--cache-config" not in flags(plain.command(None, Path("/bin/tritonserver")))
    cached = TritonServer(tmp_path, ServerPorts(http=1, grpc=2, metrics=3), response_cache_bytes=8)
    command = flags(cached.command(None, Path("/bin/tritonserver"), tmp_path / "caches"))
    assert command["--cache-config"] == ["local,size=8"]
    assert command["--cache-directory"] == [str(tmp_path / "caches")]
    with pytest.raises(ValueError):
        TritonServer(tmp_path, response_cache_bytes=-1)


def test_a_dead_server_says_how_it_died(tmp_path: Path) -> None:
    """`serve` logs live()'s reason when it stops: an abort's exit code and its C++ cause say
    more to whoever restarts the pod than "not running"."""
    from ecomsearch.server.launcher import ServerPorts, TritonServer

    log_path = tmp_path / "tritonserver.log"
    server = TritonServer(tmp_path, ServerPorts(http=1, grpc=2, metrics=3), log_path=log_path)
    assert server.live() == (False, "tritonserver is not running")
    log_path.write_text(
        "I1130 12:00:00.000 1 server.cc:1] ready\n"
        "terminate called after throwing an instance of 'boost::interprocess::lock_exception'\n"
        "  what():  boost::interprocess::lock_exception\n"
        "Signal (6) received.\n"
        " 0# 0x000055F3C1B2A0C9 in tritonserver\n"
    )
    server.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(134)"])
    server.process.wait()
    assert server.live() == (
        False,
        "tritonserver exited with code 134: terminate called after throwing an instance of "
        "'boost::interprocess::lock_exception'",
    )
    log_path.write_text("Signal (11) received.\n")
    assert server.live() == (False, "tritonserver exited with code 134: Signal (11) received.")
    log_path.write_text("I1130 12:00:00.000 1 server.cc:1] Stopped\n")
    assert server.live() == (False, "tritonserver exited with code 134")
