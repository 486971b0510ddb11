"""A throwaway Prometheus: `with PrometheusServer(targets, rules) as prometheus: ...`.

It runs the installed `prometheus` binary (Debian's `prometheus` package, which `.ci/run`
installs for the tests) on a temporary directory: one scrape job, `ecomsearch`, over the given
targets every second, the given rule files evaluated every second, listening on a free loopback
port. The server is this process's child, in a process group of its own, told to die with this
process; stopping it leaves nothing behind. Used by the operations tests and by
`ecomsearch dashboard-snapshot`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ecomsearch.server.launcher import free_port, stop_group
from ecomsearch.server.processes import die_with_parent

INSTALL_HINT = (
    "the `prometheus` binary was not found on PATH: install Prometheus (Debian: apt-get install "
    "prometheus; `.ci/run` does)"
)
JOB = "ecomsearch"
SCRAPE_INTERVAL_S = 1
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError(INSTALL_HINT)
    return binary


class PrometheusServer:
    def __init__(
        self,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        scrape_interval_s: int = SCRAPE_INTERVAL_S,
    ) -> None:
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval_s = scrape_interval_s
        self.port: int | None = None
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        binary = prometheus_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="ecomsearch-prometheus-"))
        config = {
            "global": {
                "scrape_interval": f"{self.scrape_interval_s}s",
                "scrape_timeout": f"{self.scrape_interval_s}s",
                "evaluation_interval": f"{self.scrape_interval_s}s",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.directory / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.port = free_port()
        self._log = open(self.directory / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self.process.returncode}: {self.log}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {START_TIMEOUT_S:.0f} s: {self.log}")

    @property
    def log(self) -> str:
        if self.directory is None or not (self.directory / "prometheus.log").exists():
            return ""
        return (self.directory / "prometheus.log").read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a GET on the HTTP API (/api/v1/...); PrometheusError on an error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                answer = json.load(reply)
        except urllib.error.HTTPError as e:
            answer = json.load(e)
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result: a list of {metric: labels, value: [time, "value"]}."""
        data = self.api("query", query=expression)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(
        self, expression: str, start_s: float, end_s: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query's result: a list of {metric: labels, values: [[time, "value"], ...]}."""
        data = self.api(
            "query_range",
            query=expression,
            start=f"{start_s:.3f}",
            end=f"{end_s:.3f}",
            step=f"{step_s:g}",
        )
        return data["result"]

    def values(self, expression: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's values by their label sets."""
        return {
            tuple(sorted(series["metric"].items())): float(series["value"][1])
            for series in self.query(expression)
        }

    def targets_health(self) -> dict[str, str]:
        """Each scrape target's health (up, down, unknown) by its address."""
        return {
            target["labels"]["instance"]: target["health"]
            for target in self.api("targets")["activeTargets"]
        }

    def wait_for(self, expression: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Polls until the expression has a non-empty result; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expression)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
