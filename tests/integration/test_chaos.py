"""Chaos, served for real: a model instance's process killed (between requests, with load right
after; see ecomsearch.loadtest.chaos.kill_between_requests), the admin protocols
without their key, the request that crashes tritonserver 2.51's HTTP servers.

(Killing the launcher itself, and stopping it with signals, is in test_server_lifecycle.py.)
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ecomsearch import contract
from ecomsearch.client import SearchClient
from ecomsearch.loadtest.chaos import (
    STUB_MODELS,
    SearchLoad,
    http_status,
    kill_between_requests,
    send_form_body,
)
from ecomsearch.server.launcher import TritonServer
from ecomsearch.server.processes import SHM_DIR, group_members, shm_regions, stubs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESTART_TIMEOUT_S = 60.0
# What tritonserver 2.51 prints when it aborts because a stub died holding the lock of its
# message queue (see kill_between_requests; upstream triton-inference-server/server#8882).
UPSTREAM_QUEUE_LOCK_ABORT = "boost::interprocess::lock_exception"


class ChaosServers:
    """The server these tests kill processes of, started again when one of them took the whole
    server down, so one such failure is reported once and not again by every later test."""

    def __init__(self, model_repository: Path, log_dir: Path) -> None:
        self.model_repository = model_repository
        self.log_dir = log_dir
        self.server: TritonServer | None = None

    def current(self) -> TritonServer:
        if self.server is not None and not self.server.live()[0]:
            self.server.stop()
            self.server = None
        if self.server is None:
            log_path = self.log_dir / f"tritonserver-{len(list(self.log_dir.iterdir()))}.log"
            self.server = TritonServer.local(self.model_repository, log_path)
            self.server.start()
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="module")
def chaos_servers(model_repository, tmp_path_factory) -> Iterator[ChaosServers]:
    servers = ChaosServers(model_repository, tmp_path_factory.mktemp("chaos"))
    try:
        yield servers
    finally:
        servers.stop()


@pytest.mark.parametrize("model", STUB_MODELS)
def test_a_killed_model_instance_is_replaced_and_searches_succeed_again(chaos_servers, model):
    server = chaos_servers.current()
    before = {s.pid: s for s in stubs(group_members(server.process.pid)) if s.alive}
    victim = next(s for s in before.values() if s.model == model)
    restarts = len(server.watchdog.restarts)
    ready_seen: set[int] = set()
    # Killed between requests, then loaded at once: see kill_between_requests for why not
    # mid-request (tritonserver 2.51 aborts).
    killed_at = kill_between_requests(server.grpc_url, victim.pid)
    with SearchLoad(server.grpc_url) as load:
        deadline = killed_at + RESTART_TIMEOUT_S
        while len(server.watchdog.restarts) == restarts and time.monotonic() < deadline:
            ready_seen.add(http_status(f"{server.ops_url}/v2/health/ready"))
            time.sleep(0.05)
        live, reason = server.live()
        if not live and UPSTREAM_QUEUE_LOCK_ABORT in reason:
            # The kill landed while a thread of the stub (its metrics sender, say) was talking
            # to tritonserver: the known upstream abort, not the watchdog's failure to replace
            # an instance. `serve` exits on it, for the orchestrator to restart.
            pytest.xfail(f"tritonserver aborted: {reason} (upstream server#8882)")
        assert live, reason
        assert len(server.watchdog.restarts) > restarts, f"{model} was not restarted"
        replaced_at = time.monotonic()
        time.sleep(1.0)
    restarted_model, degraded_s = server.watchdog.restarts[-1]
    assert restarted_model == model
    assert 503 in ready_seen  # readiness said so while the instance was being replaced
    assert http_status(f"{server.ops_url}/v2/health/ready") == 200
    # Only requests sent before the replacement fail (some already in flight on the dead
    # instance fail seconds later, when tritonserver notices): none sent after it.
    late = [(round(at - killed_at, 2), m) for at, m in load.errors if at > replaced_at]
    assert not late, (round(replaced_at - killed_at, 2), late)
    assert load.outcomes["ok"] > 0
    with SearchClient(server.grpc_url, timeout_s=10) as client:
        for _ in range(20):
            assert client.search("usb cable", k=3)
    after = [s for s in stubs(group_members(server.process.pid)) if s.alive]
    assert victim.pid not in {s.pid for s in after}
    assert (
        Counter(s.model for s in after)[model] >= Counter(s.model for s in before.values())[model]
    )
    print(
        f"{model}: degraded {degraded_s:.1f} s, searches {dict(load.outcomes)}, "
        f"first error: {load.errors[0][1][:120] if load.errors else None}"
    )


def test_stopping_after_chaos_leaves_no_shared_memory(model_repository, tmp_path) -> None:
    server = TritonServer.local(model_repository, tmp_path / "tritonserver.log")
    server.start()
    try:
        group = server.process.pid
        victim = next(s for s in stubs(group_members(group)) if s.model == "retrieve")
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while not server.watchdog.restarts and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.watchdog.restarts, "the dead stub was not replaced"
        regions = shm_regions(group_members(group)) | {victim.shm_region}
    finally:
        server.stop()
    assert not [r for r in regions if (SHM_DIR / r).exists()]


# -- security --------------------------------------------------------------------------------


def admin_calls(client: grpcclient.InferenceServerClient, headers: dict | None):
    return {
        "statistics": lambda: client.get_inference_statistics(headers=headers),
        "model-repository": lambda: client.get_model_repository_index(headers=headers),
        "logging": lambda: client.get_log_settings(headers=headers),
        "trace": lambda: client.get_trace_settings(headers=headers),
        "shared-memory": lambda: client.get_system_shared_memory_status(headers=headers),
    }


def test_admin_protocols_are_refused_without_the_key(triton_server) -> None:
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        for headers in (None, {"triton-grpc-protocol-admin-key": "guess"}):
            for protocol, call in admin_calls(client, headers).items():
                with pytest.raises(InferenceServerException) as refused:
                    call()
                assert "restricted" in refused.value.message(), protocol
        for call in admin_calls(client, triton_server.admin_headers).values():
            call()  # the launcher's key opens each of them
        # What clients use stays open.
        assert client.is_server_ready()
        assert client.get_model_metadata(contract.SEARCH_MODEL).name == contract.SEARCH_MODEL


def test_no_model_can_be_unloaded_without_the_key(triton_server) -> None:
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model(contract.RETRIEVE_MODEL)
        assert client.is_model_ready(contract.RETRIEVE_MODEL)


def test_http_is_off_by_default(triton_server) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", triton_server.ports.http), timeout=5).close()


def test_a_four_mib_form_body_to_the_metrics_port_leaves_the_server_ready(triton_server) -> None:
    reply = send_form_body(triton_server.ports.metrics, 4 << 20)
    assert reply.startswith("HTTP/1.1 405"), reply  # refused unread by the ops endpoint
    time.sleep(1)
    assert triton_server.process.poll() is None
    assert http_status(f"{triton_server.ops_url}/v2/health/ready") == 200
    with SearchClient(triton_server.grpc_url) as client:
        assert client.search("mouse", k=1)


def test_http_when_enabled_listens_on_loopback_only(model_repository, tmp_path: Path) -> None:
    import psutil

    with TritonServer.local(
        model_repository, tmp_path / "tritonserver.log", http=True, restart_dead_stubs=False
    ) as server:
        server_process = psutil.Process(server.process.pid)

        def listening() -> dict[int, str]:
            return {
                c.laddr.port: c.laddr.ip
                for c in server_process.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            }

        # Ready is reported once gRPC answers; tritonserver may open its HTTP socket a moment
        # later on a loaded machine, so wait for it (briefly) before looking at its address.
        deadline = time.monotonic() + 15
        while server.ports.http not in listening() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listening()[server.ports.http] == "127.0.0.1"
        assert server.ports.metrics not in listening()  # the ops endpoint is the launcher's
        with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as reply:
            assert reply.status == 200
        index_url = f"{server.http_url}/v2/repository/index"
        refused = urllib.request.Request(index_url, data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(refused, timeout=5)
        assert "restricted" in error.value.read().decode()
        allowed = urllib.request.Request(
            index_url, data=b"{}", method="POST", headers={"admin-key": server.admin_key}
        )
        with urllib.request.urlopen(allowed, timeout=5) as reply:
            assert reply.status == 200
