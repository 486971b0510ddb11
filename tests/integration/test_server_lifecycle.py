"""`ecomsearch serve` stops cleanly, and broken indexes refuse to load with a clear message."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ecomsearch.index.manifest import FAISS_FILE, MANIFEST_FILE
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.server.launcher import ServerError, ServerPorts, TritonServer

from .conftest import copy_model_repository, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_stops_cleanly_leaving_no_process(model_repository, stop_signal):
    ports = ServerPorts.free()
    command = [
        str(Path(sys.executable).parent / "ecomsearch"),
        "serve",
        "--model-repository",
        str(model_repository),
        "--address",
        "127.0.0.1",
        "--http-port",
        str(ports.http),
        "--grpc-port",
        str(ports.grpc),
        "--metrics-port",
        str(ports.metrics),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(ports.http, process)
        descendants = psutil.Process(process.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert "tritonserver" in names and "triton_python_backend_stub" in names, names
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"127.0.0.1:{ports.grpc}" in output  # it logs where it listens
    time.sleep(0.5)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def broken_repository(model_repository: Path, target: Path, damage) -> Path:
    repository = copy_model_repository(target)
    index_dir = ModelRepositoryLayout(repository).index_dir
    shutil.copytree(ModelRepositoryLayout(model_repository).index_dir, index_dir)
    damage(index_dir)
    return repository


def other_encoder(index_dir: Path) -> None:
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())
    manifest["encoder_fingerprint"] = "0" * 64
    (index_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def truncated_faiss(index_dir: Path) -> None:
    data = (index_dir / FAISS_FILE).read_bytes()
    (index_dir / FAISS_FILE).write_bytes(data[: len(data) // 2])


def missing_manifest(index_dir: Path) -> None:
    (index_dir / MANIFEST_FILE).unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (other_encoder, "built with encoder 000000000000 but the served encoder is"),
        (truncated_faiss, "index.faiss is corrupt"),
        (missing_manifest, "manifest.json missing"),
    ],
    ids=["mismatched-encoder", "corrupt-faiss", "no-manifest"],
)
def test_broken_index_refuses_to_load(model_repository, tmp_path, damage, message):
    repository = broken_repository(model_repository, tmp_path / "repository", damage)
    server = TritonServer.local(repository, tmp_path / "server.log")
    with pytest.raises(ServerError) as caught:
        server.start(timeout_s=120)
    assert message in str(caught.value), str(caught.value)[-3000:]
    assert server.process is None
