"""The launcher's public HTTP port for operators: Prometheus metrics and health probes.

tritonserver 2.51's HTTP servers (the HTTP/REST API and the metrics port alike) crash on a
form-urlencoded request body of about 4 MiB (3 MiB is survived), whatever the URL, and have no
body limit. So tritonserver's own metrics port listens on the loopback interface only, and this
endpoint faces the network instead. It answers three GETs and refuses any request that carries
a body, without reading it:

- `GET /metrics`: tritonserver's Prometheus metrics (the Python models' own among them),
  relayed, followed by the launcher's `ecomsearch_server_live` and `ecomsearch_server_ready`
  (1 or 0, as the probes below answer). When tritonserver's metrics cannot be read, the
  launcher's are served alone, so a dead server shows as not ready rather than as a failed
  scrape;
- `GET /v2/health/live`: 200 while the server runs and has not given up on a model;
- `GET /v2/health/ready`: 200 when tritonserver is ready and every model instance's stub is
  alive (503 while the watchdog replaces a dead one), the same paths as Triton's own probes.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ecomsearch.serving.metrics import SERVER_LIVE, SERVER_READY

log = logging.getLogger(__name__)

METRICS_TIMEOUT_S = 5.0


def launcher_metrics(live: bool, ready: bool) -> bytes:
    """The launcher's own gauges, in the Prometheus text format."""
    lines = []
    for name, value, meaning in (
        (SERVER_LIVE, live, "the server runs and has not given up on a model"),
        (SERVER_READY, ready, "every model is loaded and every model instance is alive"),
    ):
        lines += [
            f"# HELP {name} 1 when {meaning} (/v2/health/{name.rsplit('_', 1)[1]})",
            f"# TYPE {name} gauge",
            f"{name} {int(value)}",
        ]
    return ("\n".join(lines) + "\n").encode()


class OpsEndpoint:
    """Serves in a background thread; `close()` stops it."""

    def __init__(
        self,
        address: str,
        port: int,
        metrics_url: str,
        live: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        handler = _handler(metrics_url, live, ready)
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-endpoint", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> OpsEndpoint:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(
    metrics_url: str,
    live: Callable[[], tuple[bool, str]],
    ready: Callable[[], tuple[bool, str]],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ecomsearch-ops"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            log.debug("ops endpoint: " + format, *args)

        def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _text(self, status: HTTPStatus, text: str) -> None:
            self._reply(status, (text + "\n").encode(), "text/plain; charset=utf-8")

        def _has_body(self) -> bool:
            length = self.headers.get("Content-Length", "0").strip()
            return (length not in ("", "0")) or "Transfer-Encoding" in self.headers

        def do_GET(self) -> None:
            if self._has_body():
                # Unread, so the connection cannot be reused.
                self.close_connection = True
                self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request bodies are refused")
                return
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._metrics()
            elif path in ("/v2/health/live", "/v2/health/ready"):
                ok, reason = (live if path.endswith("live") else ready)()
                self._text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, reason)
            else:
                self._text(HTTPStatus.NOT_FOUND, "not found")

        def _refuse(self) -> None:
            self.close_connection = True
            self._text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET")

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815

        def _metrics(self) -> None:
            body, content_type = b"", "text/plain; version=0.0.4; charset=utf-8"
            try:
                with urllib.request.urlopen(metrics_url, timeout=METRICS_TIMEOUT_S) as reply:
                    body = reply.read()
                    content_type = reply.headers.get("Content-Type", content_type)
            except (urllib.error.URLError, OSError) as e:
                log.warning("tritonserver metrics unavailable: %s", e)
            if body and not body.endswith(b"\n"):
                body += b"\n"
            body += launcher_metrics(live()[0], ready()[0])
            self._reply(HTTPStatus.OK, body, content_type)

    return Handler
