"""Start and stop the `tritonserver` shipped in the nvidia-pytriton wheel.

The server runs in its own process group (setsid) because Python-backend stub processes can
outlive a server stopped with SIGTERM; stopping the whole group leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ecomsearch import contract

log = logging.getLogger(__name__)

DROP_IN_BACKENDS = Path(__file__).parent / "backends"
READY_POLL_INTERVAL_S = 0.25


class ServerError(RuntimeError):
    """tritonserver could not be found, did not become ready, or died."""


@dataclass(frozen=True)
class ServerPorts:
    http: int = contract.DEFAULT_HTTP_PORT
    grpc: int = contract.DEFAULT_GRPC_PORT
    metrics: int = contract.DEFAULT_METRICS_PORT

    @classmethod
    def free(cls) -> ServerPorts:
        """Three ports free right now on the loopback interface (for tests)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            http, grpc, metrics = (s.getsockname()[1] for s in sockets)
        finally:
            for s in sockets:
                s.close()
        return cls(http=http, grpc=grpc, metrics=metrics)


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    library_dir: Path
    python_backend_dir: Path
    stub: Path

    @classmethod
    def from_pytriton(cls) -> TritonInstallation:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServerError("nvidia-pytriton is not installed: pip install 'ecomsearch[server]'")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        root = package_dir / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        installation = cls(
            binary=root / "bin" / "tritonserver",
            library_dir=package_dir.parent / "nvidia_pytriton.libs",
            python_backend_dir=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (installation.binary, installation.python_backend_dir, installation.stub):
            if not path.exists():
                raise ServerError(
                    f"{path} not found in the nvidia-pytriton wheel (Python {version})"
                )
        return installation

    def populate_backend_directory(self, target: Path) -> None:
        """The Python backend with the stub for this Python, plus the drop-in `onnxruntime`."""
        python_dir = target / "python"
        shutil.copytree(
            self.python_backend_dir, python_dir, ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(self.stub, python_dir / "triton_python_backend_stub")
        shutil.copytree(
            DROP_IN_BACKENDS,
            target,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )


class TritonServer:
    """A tritonserver process over one model repository; use as a context manager."""

    def __init__(
        self,
        model_repository: Path | str,
        ports: ServerPorts | None = None,
        model_config_name: str | None = None,
        bind_address: str = "0.0.0.0",
        log_path: Path | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports or ServerPorts()
        self.model_config_name = model_config_name
        self.bind_address = bind_address
        self.log_path = log_path
        self.log_verbose = log_verbose
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._backend_dir: tempfile.TemporaryDirectory | None = None
        self._log_stream = None

    @classmethod
    def local(
        cls, model_repository: Path | str, log_path: Path | None = None, **options
    ) -> TritonServer:
        """A private server for a command or a test: loopback only, on ports free right now."""
        return cls(
            model_repository,
            ServerPorts.free(),
            bind_address="127.0.0.1",
            log_path=log_path,
            **options,
        )

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self, backend_dir: Path, binary: Path) -> list[str]:
        command = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--http-address={self.bind_address}",
            f"--grpc-address={self.bind_address}",
            f"--metrics-address={self.bind_address}",
            f"--log-verbose={self.log_verbose}",
            # Exit with the readiness error instead of serving a half-loaded repository.
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        if self.model_config_name:
            command.append(f"--model-config-name={self.model_config_name}")
        return [*command, *self.extra_args]

    def environment(self, installation: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        # The 3.11 stub imports packages from the first python3 on PATH: this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(installation.library_dir), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        installation = TritonInstallation.from_pytriton()
        self._backend_dir = tempfile.TemporaryDirectory(prefix="ecomsearch-backends-")
        backend_dir = Path(self._backend_dir.name)
        installation.populate_backend_directory(backend_dir)
        if self.log_path is not None:
            self._log_stream = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.command(backend_dir, installation.binary),
            env=self.environment(installation),
            stdin=subprocess.DEVNULL,
            stdout=self._log_stream,
            stderr=subprocess.STDOUT if self._log_stream else None,
            start_new_session=True,
        )
        try:
            self.wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "tritonserver ready: HTTP %s, gRPC %s, metrics %s (model repository %s)",
            self.http_url,
            self.grpc_url,
            self.metrics_url,
            self.model_repository,
        )
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(
                    f"tritonserver exited with code {code} before ready{self._log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(READY_POLL_INTERVAL_S)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        """Triton's error lines (a model's load failure names its cause), then the last lines."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        log_lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in log_lines if re.match(r"E\d{4} ", line)]
        return (
            "\n--- tritonserver errors ---\n"
            + "\n".join(errors[-lines:])
            + "\n--- tritonserver log (tail) ---\n"
            + "\n".join(log_lines[-lines:])
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL to whatever is left of it."""
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
            # Stub processes may survive their server: nothing of the group may remain.
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None
        if self._backend_dir is not None:
            self._backend_dir.cleanup()
            self._backend_dir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
