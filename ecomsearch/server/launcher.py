"""Start, watch and stop a `tritonserver`: the one in the nvidia-pytriton wheel, or a system
installation such as the NGC container's /opt/tritonserver.

Safe by default:
- gRPC (the product API) binds where it is asked to; HTTP/REST is off unless asked for, and
  then listens on the loopback interface only (tritonserver 2.51's HTTP server crashes on a
  large form-urlencoded body, see ecomsearch.server.ops), as does tritonserver's own metrics
  port. The network-facing metrics and health port is the launcher's OpsEndpoint.
- The admin protocols (shared memory, model repository, logging, trace, statistics) need a key
  (`admin_key`, random unless given), sent as the ADMIN_KEY_HEADER gRPC header.
- Models load in explicit model-control mode, so the launcher, and only a holder of the key, can
  reload one: the StubWatchdog does when a model instance's stub dies.

The server runs in its own process group (setsid) because Python-backend stub processes can
outlive a server stopped with SIGTERM; stopping the whole group leaves nothing behind. The
server dies with the launcher (PR_SET_PDEATHSIG), and a reaper process cleans up after the group
however it ends (ecomsearch.server.reaper).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ecomsearch import contract
from ecomsearch.live.location import STORE_URL_ENV, WRITE_KEY_ENV
from ecomsearch.server.ops import OpsEndpoint
from ecomsearch.server.processes import die_with_parent
from ecomsearch.server.watchdog import StubWatchdog

log = logging.getLogger(__name__)

DROP_IN_BACKENDS = Path(__file__).parent / "backends"
READY_POLL_INTERVAL_S = 0.25
LOOPBACK = "127.0.0.1"
# Protocols a client of the search service never needs. Health, metadata, model config and
# inference stay open: tritonclient, perf_analyzer and Locust users call them.
ADMIN_PROTOCOLS = ("shared-memory", "model-repository", "logging", "trace", "statistics")
ADMIN_KEY_NAME = "admin-key"
# tritonserver prefixes the key's name for gRPC.
ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"
RELOAD_TIMEOUT_S = 300.0
# A config parameter no model reads; changing it forces tritonserver to replace every instance.
RELOAD_PARAMETER = "ecomsearch_reload"
REAPER_EXIT_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 10


# Ports handed out for listening are taken below the kernel's ephemeral range: a port from
# that range, free when chosen, can become the local end of one of the machine's outgoing
# connections (the test suite makes thousands) before the server binds it, and then the server
# cannot. Seen once: a test server started without its HTTP listener.
_FALLBACK_EPHEMERAL_RANGE = (32768, 60999)
_LISTEN_PORT_LOW = 10000


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL_RANGE


def free_port(host: str = LOOPBACK, exclude: tuple[int, ...] = ()) -> int:
    """A port free right now on `host`, outside the ephemeral range when the range leaves room
    (else any port the kernel offers)."""
    low, high = ephemeral_port_range()
    candidates = [
        (start, end)
        for start, end in ((_LISTEN_PORT_LOW, low - 1), (high + 1, 65535))
        if end - start > 1000
    ]
    chooser = random.SystemRandom()
    for _ in range(100 if candidates else 0):
        start, end = chooser.choice(candidates)
        port = chooser.randint(start, end)
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """tritonserver could not be found, did not become ready, or died."""


@dataclass(frozen=True)
class ServerPorts:
    """Public ports. `metrics` is the launcher's OpsEndpoint (metrics and health probes);
    tritonserver's own metrics port is a private loopback one."""

    http: int = contract.DEFAULT_HTTP_PORT
    grpc: int = contract.DEFAULT_GRPC_PORT
    metrics: int = contract.DEFAULT_METRICS_PORT

    @classmethod
    def free(cls) -> ServerPorts:
        """Three ports free right now on the loopback interface (for tests)."""
        ports: tuple[int, ...] = ()
        while len(ports) < 3:
            ports += (free_port(LOOPBACK, exclude=ports),)
        http, grpc, metrics = ports
        return cls(http=http, grpc=grpc, metrics=metrics)


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    # The pytriton wheel's libraries, Python backend and per-Python stubs; None for a system
    # installation, which finds its own libraries and backends (with the native ONNX Runtime).
    library_dir: Path | None = None
    python_backend_dir: Path | None = None
    stub: Path | None = None
    # Where the response cache's library is (caches/local/libtritoncache_local.so); None: the
    # installation's default, /opt/tritonserver/caches.
    cache_dir: Path | None = None

    @classmethod
    def system(cls, binary: Path | str) -> TritonInstallation:
        binary = Path(binary)
        if not binary.is_file():
            raise ServerError(f"{binary} not found")
        return cls(binary=binary)

    @property
    def needs_backend_directory(self) -> bool:
        return self.python_backend_dir is not None

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
            cache_dir=root / "caches",
        )
        for path in (installation.binary, installation.python_backend_dir, installation.stub):
            if not path.exists():
                raise ServerError(
                    f"{path} not found in the nvidia-pytriton wheel (Python {version})"
                )
        return installation

    def populate_backend_directory(self, target: Path) -> None:
        """The Python backend with the stub for this Python, plus the drop-in `onnxruntime`."""
        assert self.python_backend_dir is not None and self.stub is not None
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
        bind_address: str = LOOPBACK,
        log_path: Path | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        http: bool = False,
        admin_key: str | None = None,
        tritonserver: Path | str | None = None,
        restart_dead_stubs: bool = True,
        store_url: str | None = None,
        write_key: str | None = None,
        response_cache_bytes: int = 0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        # Triton's local response cache, used by the models whose config enables it (none as
        # shipped: `ecomsearch bench-cache` measures it on a copy); 0: the server has none.
        if response_cache_bytes < 0:
            raise ValueError(f"response_cache_bytes must be >= 0, got {response_cache_bytes}")
        self.response_cache_bytes = response_cache_bytes
        # The catalog store the models follow and write to; None: the one the served index
        # was built from (its manifest says), which is right unless credentials differ.
        self.store_url = store_url
        # Writes to the catalog need it when set (the catalog model checks each request).
        self.write_key = write_key
        self.ports = ports or ServerPorts()
        self.model_config_name = model_config_name
        self.bind_address = bind_address
        self.log_path = log_path
        self.log_verbose = log_verbose
        self.extra_args = extra_args
        self.http = http
        # Random unless given: then only this launcher can use the admin protocols.
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.restart_dead_stubs = restart_dead_stubs
        self.process: subprocess.Popen | None = None
        self.watchdog: StubWatchdog | None = None
        self._reaper: subprocess.Popen | None = None
        self._ops: OpsEndpoint | None = None
        self._private_metrics_port: int | None = None
        self._reloads = 0
        self._backend_dir: str | None = None
        self._log_stream = None

    @classmethod
    def local(
        cls, model_repository: Path | str, log_path: Path | None = None, **options
    ) -> TritonServer:
        """A private server for a command or a test: loopback only, on ports free right now."""
        return cls(
            model_repository,
            ServerPorts.free(),
            bind_address=LOOPBACK,
            log_path=log_path,
            **options,
        )

    @property
    def _local_host(self) -> str:
        """How this machine reaches the public ports."""
        return LOOPBACK if self.bind_address in ("0.0.0.0", "::", "") else self.bind_address

    @property
    def grpc_url(self) -> str:
        return f"{self._local_host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        if not self.http:
            raise ServerError("this server was started without HTTP (http=True enables it)")
        return f"http://{LOOPBACK}:{self.ports.http}"

    @property
    def ops_url(self) -> str:
        return f"http://{self._local_host}:{self.ports.metrics}"

    @property
    def metrics_url(self) -> str:
        return f"{self.ops_url}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC headers that open the admin protocols (statistics, model repository, ...)."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    def command(
        self, backend_dir: Path | None, binary: Path, cache_dir: Path | None = None
    ) -> list[str]:
        if self._private_metrics_port is None:
            self._private_metrics_port = self._free_private_port()
        admin = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_KEY_NAME}={self.admin_key}"
        command = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={self.ports.grpc}",
            f"--grpc-restricted-protocol={admin}",
            f"--allow-http={str(self.http).lower()}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self._private_metrics_port}",
            # Latency quantiles per model (nv_*_summary_us), beside the cumulative counters:
            # the dashboard's p99 and the SearchLatencyHighP99 alert (docs/operations.md).
            "--metrics-config=summary_latencies=true",
            f"--log-verbose={self.log_verbose}",
            # Explicit control, every model loaded at start: the repository API (behind the
            # admin key) can then reload a model whose stub died.
            "--model-control-mode=explicit",
            "--load-model=*",
            # Exit with the readiness error instead of serving a half-loaded repository.
            "--exit-on-error=true",
            # A search takes milliseconds: what is still in flight after this is stuck (on an
            # instance whose stub died), and must not hold a shutdown for the default 30 s.
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--strict-readiness=true",
        ]
        if backend_dir is not None:
            command.append(f"--backend-directory={backend_dir}")
        if self.response_cache_bytes:
            command.append(f"--cache-config=local,size={self.response_cache_bytes}")
            if cache_dir is not None:
                command.append(f"--cache-directory={cache_dir}")
        if self.http:
            command += [
                f"--http-address={LOOPBACK}",
                f"--http-port={self.ports.http}",
                f"--http-restricted-api={admin}",
            ]
        if self.model_config_name:
            command.append(f"--model-config-name={self.model_config_name}")
        return [*command, *self.extra_args]

    def environment(self, installation: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        # The 3.11 stub imports packages from the first python3 on PATH: this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if installation.library_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(installation.library_dir), env.get("LD_LIBRARY_PATH", "")) if p
            )
        if self.store_url:
            env[STORE_URL_ENV] = self.store_url
        env.pop(WRITE_KEY_ENV, None)  # only the key this launcher was given
        if self.write_key:
            env[WRITE_KEY_ENV] = self.write_key
        return env

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        installation = (
            TritonInstallation.system(self.tritonserver)
            if self.tritonserver
            else TritonInstallation.from_pytriton()
        )
        backend_dir = None
        if installation.needs_backend_directory:
            self._backend_dir = tempfile.mkdtemp(prefix="ecomsearch-backends-")
            backend_dir = Path(self._backend_dir)
            installation.populate_backend_directory(backend_dir)
        self._private_metrics_port = self._free_private_port()
        try:
            # First, so a port already in use fails before tritonserver starts.
            self._ops = OpsEndpoint(
                self.bind_address,
                self.ports.metrics,
                f"http://{LOOPBACK}:{self._private_metrics_port}/metrics",
                live=self.live,
                ready=self.ready,
            ).start()
            if self.log_path is not None:
                self._log_stream = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
            self.process = subprocess.Popen(
                self.command(backend_dir, installation.binary, installation.cache_dir),
                env=self.environment(installation),
                stdin=subprocess.DEVNULL,
                stdout=self._log_stream,
                stderr=subprocess.STDOUT if self._log_stream else None,
                start_new_session=True,
                preexec_fn=die_with_parent,  # one prctl() in the child, before exec
            )
            self._reaper = self._start_reaper(self.process.pid)
            self.wait_until_ready(timeout_s)
            if self.restart_dead_stubs:
                self.watchdog = StubWatchdog(self.process.pid, self.reload_model)
                self.watchdog.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "tritonserver ready: gRPC %s, metrics and health %s, HTTP %s (model repository %s)",
            self.grpc_url,
            self.ops_url,
            f"http://{LOOPBACK}:{self.ports.http}" if self.http else "off",
            self.model_repository,
        )
        return self

    def _free_private_port(self) -> int:
        """A loopback port for tritonserver's own metrics, free now and none of the public
        ports (which may be free now too, when they were picked but not yet bound)."""
        public = {self.ports.http, self.ports.grpc, self.ports.metrics}
        while (port := free_port()) in public:
            pass
        return port

    def _start_reaper(self, group: int) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "ecomsearch.server.reaper",
            f"--group={group}",
            f"--owner={os.getpid()}",
        ]
        if self._backend_dir:
            command.append(f"--remove={self._backend_dir}")
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ)
        )

    def _grpc_client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def is_ready(self) -> bool:
        """tritonserver's own readiness (every model loaded), over gRPC."""
        from tritonclient.utils import InferenceServerException

        try:
            with self._grpc_client() as client:
                return bool(client.is_server_ready(client_timeout=2))
        except (InferenceServerException, OSError):
            return False

    def live(self) -> tuple[bool, str]:
        if self.process is None:
            return False, "tritonserver is not running"
        if self.process.poll() is not None:
            return False, f"tritonserver exited with code {self.process.returncode}{self._cause()}"
        if self.watchdog is not None and self.watchdog.failed:
            return False, self.watchdog.failed
        return True, "live"

    def ready(self) -> tuple[bool, str]:
        """Ready to serve every request: live, tritonserver ready, and no dead stub."""
        live, reason = self.live()
        if not live:
            return False, reason
        if self.watchdog is not None and self.watchdog.degraded_since is not None:
            return False, "a model instance died and is being replaced"
        if not self.is_ready():
            return False, "tritonserver is not ready"
        return True, "ready"

    def reload_model(self, model: str) -> None:
        """Loads fresh instances of `model` through the (restricted) model-repository API, beside
        the old ones, then swaps them in.

        tritonserver treats a load whose files and config are unchanged as a no-op, and one that
        changes only instance_group as an in-place update that keeps the existing (dead)
        instances. So the model's current config goes back as an override with one parameter
        changed, RELOAD_PARAMETER, which the models ignore: a different config outside
        instance_group is what makes tritonserver replace every instance. The repository's
        files are not touched.
        """
        import json

        with self._grpc_client() as client:
            config = client.get_model_config(model, as_json=True, client_timeout=30)["config"]
            self._reloads += 1
            config.setdefault("parameters", {})[RELOAD_PARAMETER] = {
                "string_value": str(self._reloads)
            }
            client.load_model(
                model,
                config=json.dumps(config),
                headers=self.admin_headers,
                client_timeout=RELOAD_TIMEOUT_S,
            )

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

    def _cause(self) -> str:
        """The last line tritonserver wrote before dying, when it says why it aborted (a C++
        `terminate called ...`, a signal), for the launcher's log and the orchestrator's."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(max(0, log_file.seek(0, 2) - 16_384))
            tail = log_file.read().decode(errors="replace").splitlines()
        for prefix in ("terminate called", "Signal ("):  # the first says more
            causes = [line.strip() for line in tail if line.startswith(prefix)]
            if causes:
                return f": {causes[-1]}"
        return ""

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
        """SIGTERM to the whole process group, then SIGKILL to whatever is left of it; then the
        reaper removes what the group left behind (shared memory, the backend directory)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        process, self.process = self.process, None
        if process is not None and not stop_group(process, timeout_s):
            log.warning("tritonserver did not stop within %.0f s; killed it", timeout_s)
        if self._reaper is not None:
            try:
                self._reaper.wait(timeout=REAPER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the reaper did not finish; killing it")
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None
        if self._ops is not None:
            self._ops.close()
            self._ops = None
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None
        if self._backend_dir is not None:  # the reaper removed it, unless it had to be killed
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Sends `sig` to process group `pgid`; a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(process: subprocess.Popen, timeout_s: float) -> bool:
    """SIGTERM to the group `process` leads, up to `timeout_s` for it to exit, then SIGKILL to
    whatever is left of the group (children may outlive their leader, as Python-backend stubs
    outlive tritonserver). Returns whether the leader exited within the timeout."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
        stopped = True
    except subprocess.TimeoutExpired:
        stopped = False
    signal_group(process.pid, signal.SIGKILL)
    process.wait()
    return stopped
