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
from ecomsearch.server.processes import SHM_DIR, group_members, shm_regions

from .conftest import copy_model_repository, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(
    "stop_signal",
    [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
    ids=["SIGTERM", "Ctrl-C", "kill-9"],
)
def test_serve_stops_leaving_no_process_shared_memory_or_directory(model_repository, stop_signal):
    """However the launcher ends, even by SIGKILL, which it cannot catch: tritonserver dies with
    it (PR_SET_PDEATHSIG) and the reaper removes the stubs, their /dev/shm regions and the
    backend directory."""
    ports = ServerPorts.free()
    command = [
        str(Path(sys.executable).parent / "ecomsearch"),
        "serve",
        "--model-repository",
        str(model_repository),
        "--grpc-port",
        str(ports.grpc),
        "--metrics-port",
        str(ports.metrics),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(ports.metrics, process)
        descendants = psutil.Process(process.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert "tritonserver" in names and "triton_python_backend_stub" in names, names
        server = next(p for p in descendants if p.name() == "tritonserver")
        regions = shm_regions(group_members(server.pid))
        backend_dir = next(
            Path(a.split("=", 1)[1]) for a in server.cmdline() if a.startswith("--backend-dir")
        )
        assert regions and all((SHM_DIR / r).exists() for r in regions)
        assert backend_dir.is_dir()
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (-9 if stop_signal == signal.SIGKILL else 0), output
    if stop_signal != signal.SIGKILL:
        assert f"127.0.0.1:{ports.grpc}" in output  # it logs where it listens
    deadline = time.monotonic() + 20  # after SIGKILL, the reaper's poll and clean-up
    while time.monotonic() < deadline:
        alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        left = [r for r in regions if (SHM_DIR / r).exists()]
        if not alive and not left and not backend_dir.exists():
            break
        time.sleep(0.25)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert not left, f"shared memory left behind: {left}"
    assert not backend_dir.exists()


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
