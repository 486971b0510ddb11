"""`ecomsearch chaos`: a hostile client and a careless operator, against real servers, reported
as tables. The tests (tests/integration/test_chaos.py, test_hostile_input.py,
test_server_lifecycle.py, tests/unit/test_index_atomic.py) assert the same behaviour; this
command shows it, with figures, on whatever catalog and machine it runs on.

Scenarios: malformed requests to every model (each sent beside well-formed ones); kill -9 of
each model's stub process under load; kill -9 and SIGTERM of the launcher; index builds
interrupted by Ctrl-C and by kill -9; the admin protocols without their key, and the body that
crashes tritonserver 2.51's HTTP servers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.server.launcher import ServerPorts, TritonServer
from ecomsearch.server.processes import SHM_DIR, group_members, shm_regions, stubs

STUB_MODELS = (
    contract.PREPROCESS_MODEL,
    contract.ENCODER_MODEL,
    contract.RETRIEVE_MODEL,
    contract.RANKER_MODEL,
    contract.SELECT_MODEL,
)
RESTART_TIMEOUT_S = 60.0
Row = dict[str, Any]


def _texts(*queries: bytes) -> np.ndarray:
    return np.array([[q] for q in queries], dtype=object)


def _unit(rows: int) -> np.ndarray:
    vectors = np.random.default_rng(0).normal(size=(rows, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _tokens(ids: list[int], mask: list[int] | None = None) -> dict[str, np.ndarray]:
    return {
        contract.INPUT_IDS: np.array([ids], np.int64),
        contract.ATTENTION_MASK: np.array([mask or [1] * len(ids)], np.int64),
    }


def _features(count: int, value: float = 0.0, width: int = 17) -> dict[str, np.ndarray]:
    features = np.zeros((1, count, width), np.float32)
    features[0, 0, 0] = value
    return {contract.CANDIDATE_FEATURES: features}


def _candidates(rows: list[int], scores: list[float], top_k: int | None = None) -> dict:
    inputs = {
        contract.CANDIDATE_ROWS: np.array([rows], np.int64),
        contract.CANDIDATE_SCORES: np.array([scores], np.float32),
    }
    if top_k is not None:
        inputs[contract.TOP_K] = np.array([[top_k]], np.int32)
    return inputs


# A well-formed request for each model, sent beside the bad ones.
WELL_FORMED = {
    contract.SEARCH_MODEL: {contract.QUERY: _texts(b"wireless gaming mouse")},
    contract.PREPROCESS_MODEL: {contract.QUERY: _texts(b"wireless gaming mouse")},
    contract.ENCODER_MODEL: _tokens([101, 7403, 5541, 102]),
    contract.RETRIEVE_MODEL: {contract.QUERY: _texts(b"mouse"), contract.EMBEDDING: _unit(1)},
    contract.RANKER_MODEL: _features(400),
    # Candidate rows are the products' store keys, which start at 1.
    contract.SELECT_MODEL: _candidates([1, 2, 3, -1], [0.5, 2.0, 1.0, 0.0]),
    contract.RECOMMEND_MODEL: {contract.USER_ID: _texts(b"shopper-1")},
    contract.RECOMMEND_CANDIDATES_MODEL: {contract.USER_ID: _texts(b"shopper-1")},
    contract.RECOMMEND_RANKER_MODEL: _features(256, width=15),
    # The demo catalog's first product (and so the test fixture's).
    contract.SIMILAR_MODEL: {contract.PRODUCT_ID: _texts(b"case-fan-00000")},
    contract.SIMILAR_CANDIDATES_MODEL: {contract.PRODUCT_ID: _texts(b"case-fan-00000")},
    contract.EVENTS_MODEL: {
        contract.EVENT_USER_IDS: np.array([b"shopper-1"], dtype=object),
        contract.EVENT_PRODUCT_IDS: np.array([b"case-fan-00000"], dtype=object),
        contract.EVENT_KINDS_INPUT: np.array([b"view"], dtype=object),
    },
}


def _search(*queries: bytes, top_k: int | None = None) -> dict[str, np.ndarray]:
    inputs = {contract.QUERY: _texts(*queries)} if queries else {}
    if top_k is not None:
        inputs[contract.TOP_K] = np.full((max(len(queries), 1), 1), top_k, np.int32)
    return inputs


def _retrieve(embedding: np.ndarray) -> dict[str, np.ndarray]:
    return {contract.QUERY: _texts(b"mouse"), contract.EMBEDDING: embedding}


SEARCH, ENCODER, RETRIEVE = contract.SEARCH_MODEL, contract.ENCODER_MODEL, contract.RETRIEVE_MODEL
RANKER, SELECT = contract.RANKER_MODEL, contract.SELECT_MODEL
# (what, model, inputs)
BAD_INPUTS: list[tuple[str, str, dict[str, np.ndarray]]] = [
    ("empty query", SEARCH, _search(b"")),
    ("zero-width spaces only", SEARCH, _search("\u200b\u200b".encode())),
    ("NULs only", SEARCH, _search(b"\x00\x00\x00")),
    ("invalid UTF-8", SEARCH, _search(b"mouse \xc3\x28")),
    ("1 MiB query", SEARCH, _search(b"x" * (1 << 20))),
    ("top_k 0", SEARCH, _search(b"ssd", top_k=0)),
    ("top_k 10^9", SEARCH, _search(b"ssd", top_k=10**9)),
    ("top_k without query", SEARCH, _search(top_k=5)),
    ("query as FP32", SEARCH, {contract.QUERY: np.array([[1.5]], np.float32)}),
    ("65 queries", SEARCH, _search(*[b"ssd"] * 65)),
    ("blank query", contract.PREPROCESS_MODEL, _search(b" \t\n")),
    ("negative token id", ENCODER, _tokens([101, -5, 102])),
    ("token id past vocabulary", ENCODER, _tokens([101, 10**9, 102])),
    ("mask of 7", ENCODER, _tokens([101, 2000, 102], [1, 7, 1])),
    ("513 tokens", ENCODER, _tokens([1000] * 513)),
    ("NaN embedding", RETRIEVE, _retrieve(np.full((1, 384), np.nan, np.float32))),
    ("infinite embedding", RETRIEVE, _retrieve(np.full((1, 384), np.inf, np.float32))),
    ("embedding of 383", RETRIEVE, _retrieve(np.zeros((1, 383), np.float32))),
    ("NaN feature", RANKER, _features(400, np.nan)),
    ("100,000 candidates", RANKER, _features(100_000)),
    ("row -2", SELECT, _candidates([1, -2], [1.0, 2.0])),
    ("row -2^62", SELECT, _candidates([-(2**62), 1], [1.0, 2.0])),
    ("row past the catalog", SELECT, _candidates([1, 10**9], [1.0, 2.0])),
    ("NaN score", SELECT, _candidates([1, 2], [np.nan, 2.0])),
    ("1,025 candidates", SELECT, _candidates([1] * 1025, [0.0] * 1025)),
]


def infer_raw(url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[str, str]:
    """One request of any tensors: ("OK", "") or the gRPC status name and the message."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.infer(model, tensors, client_timeout=60)
        except InferenceServerException as e:
            return str(e.status()).removeprefix("StatusCode."), e.message() or ""
    return "OK", ""


def _ready(server: TritonServer) -> bool:
    return http_status(f"{server.ops_url}/v2/health/ready") == 200


def http_status(url: str) -> int:
    """The HTTP status of a GET, 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def bad_inputs(server: TritonServer) -> list[Row]:
    rows = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for what, model, inputs in BAD_INPUTS:
            neighbours = [
                pool.submit(infer_raw, server.grpc_url, model, WELL_FORMED[model]) for _ in range(3)
            ]
            probe = pool.submit(infer_raw, server.grpc_url, model, inputs)
            status, message = probe.result()
            answered = sum(f.result()[0] == "OK" for f in neighbours)
            rows.append(
                {
                    "input": what,
                    "model": model,
                    "status": status,
                    "message": message[:90],
                    "neighbours answered": f"{answered}/3",
                    "server ready": _ready(server),
                }
            )
    return rows


class SearchLoad:
    """Two clients searching back to back; errors kept with their send times."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        from ecomsearch.client import SearchClient, SearchError

        with SearchClient(self.url, timeout_s=10) as client:
            while not self._stop.is_set():
                sent_at = time.monotonic()
                try:
                    client.search("wireless gaming mouse", k=5)
                    self.outcomes["ok"] += 1
                except SearchError as e:
                    self.outcomes[type(e).__name__] += 1
                    self.errors.append((sent_at, str(e)))

    def __enter__(self) -> SearchLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def kill_between_requests(url: str, pid: int, warm_up_s: float = 0.5) -> float:
    """Searches for `warm_up_s`, lets every request finish, then kills `pid` with SIGKILL;
    returns when it was killed (monotonic). The load that follows meets the dead instance.

    Not killed mid-request: a Python-backend stub killed while it holds the lock of its
    shared-memory message queue makes tritonserver 2.51 abort (`terminate called after throwing
    an instance of 'boost::interprocess::lock_exception'`, from TRITONBACKEND_ModelInstanceExecute
    when the next request reaches that instance; the same crash is open upstream as
    triton-inference-server/server#8882). It happened once in CI. The launcher then reports not
    live and `serve` exits, for the orchestrator to restart it; what the watchdog can replace is
    an instance that died between requests, which is what this measures."""
    with SearchLoad(url):
        time.sleep(warm_up_s)
    # Every search has been answered (SearchLoad joined its threads): the stub is waiting.
    time.sleep(0.2)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return killed_at


def stub_kills(server: TritonServer) -> list[Row]:
    rows = []
    for model in STUB_MODELS:
        victim = next(
            s for s in stubs(group_members(server.process.pid)) if s.alive and s.model == model
        )
        restarts = len(server.watchdog.restarts)
        not_ready_s = 0.0
        killed_at = kill_between_requests(server.grpc_url, victim.pid, warm_up_s=1.0)
        with SearchLoad(server.grpc_url) as load:
            while (
                len(server.watchdog.restarts) == restarts
                and time.monotonic() < killed_at + RESTART_TIMEOUT_S
            ):
                checked = time.monotonic()
                if not _ready(server):
                    not_ready_s += time.monotonic() - checked + 0.05
                time.sleep(0.05)
            replaced_at = time.monotonic()
            time.sleep(2.0)
        restarted = len(server.watchdog.restarts) > restarts
        failed_before = [m for at, m in load.errors if at <= replaced_at]
        failed_after = [m for at, m in load.errors if at > replaced_at]
        rows.append(
            {
                "killed": f"{victim.instance} (kill -9)",
                "replaced after": f"{replaced_at - killed_at:.1f} s" if restarted else "never",
                "/ready 503 for": f"~{not_ready_s:.1f} s",
                "searches answered": load.outcomes["ok"],
                "failed (sent before)": len(failed_before),
                "failed (sent after)": len(failed_after),
                "error": (failed_before or failed_after or [""])[0][:80],
            }
        )
    return rows


def launcher_kills(repository: Path) -> list[Row]:
    import psutil

    rows = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        ports = ServerPorts.free()
        command = [
            str(Path(sys.executable).parent / "ecomsearch"),
            "serve",
            f"--model-repository={repository}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
        ]
        launcher = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 180
            while http_status(f"http://127.0.0.1:{ports.metrics}/v2/health/ready") != 200:
                if time.monotonic() > deadline or launcher.poll() is not None:
                    raise RuntimeError("ecomsearch serve did not become ready")
                time.sleep(0.3)
            descendants = psutil.Process(launcher.pid).children(recursive=True)
            server = next(p for p in descendants if p.name() == "tritonserver")
            regions = shm_regions(group_members(server.pid))
            backend_dir = next(
                Path(a.split("=", 1)[1])
                for a in server.cmdline()
                if a.startswith("--backend-directory=")
            )
            signalled = time.monotonic()
            launcher.send_signal(sig)
            launcher.wait(timeout=90)
            while time.monotonic() < signalled + 30:
                alive = [p for p in descendants if p.is_running() and p.status() != "zombie"]
                left = [r for r in regions if (SHM_DIR / r).exists()]
                if not alive and not left and not backend_dir.exists():
                    break
                time.sleep(0.1)
            rows.append(
                {
                    "launcher": "kill -9" if sig == signal.SIGKILL else "SIGTERM",
                    "processes it had started": len(descendants),
                    "all gone after": f"{time.monotonic() - signalled:.1f} s",
                    "processes left": len(alive),
                    "/dev/shm regions left": f"{len(left)} of {len(regions)}",
                    "temporary directory left": backend_dir.exists(),
                }
            )
        finally:
            if launcher.poll() is None:
                launcher.kill()
    return rows


def _small_catalog(source: Path, target: Path, products: int) -> Path:
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as stream:
        lines = [line for _, line in zip(range(products), stream, strict=False)]
    target.write_text("".join(lines), encoding="utf-8")
    return target


def index_interrupts(catalog: Path, source: Path, work: Path) -> list[Row]:
    """build-index of 2,000 products into a repository of its own (linked to `source`'s
    encoder), interrupted while it embeds or writes."""
    from ecomsearch.index.manifest import IndexManifest
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.workspace import link_model_repository

    repository = link_model_repository(source, work / "repository")
    layout = ModelRepositoryLayout(repository)
    rows = []
    small = _small_catalog(catalog, work / "catalog.jsonl", 2000)
    ecomsearch = str(Path(sys.executable).parent / "ecomsearch")

    def build(cache: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [ecomsearch, "build-index", f"--catalog={small}", f"--model-repository={repository}",
             f"--cache-dir={cache}", "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def scratch() -> list[str]:
        return sorted(p.name for p in layout.index_dir.parent.glob(".index.building-*"))

    subprocess.run(
        [ecomsearch, "build-index", f"--catalog={small}", f"--model-repository={repository}",
         f"--cache-dir={work / 'cache-warm'}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    before = IndexManifest.read(layout.index_dir).built_at
    interruptions = (
        (signal.SIGINT, "Ctrl-C while embedding", False),
        (signal.SIGTERM, "SIGTERM while embedding", False),
        (signal.SIGKILL, "kill -9 while embedding", False),
        (signal.SIGINT, "Ctrl-C while writing", True),
        (signal.SIGKILL, "kill -9 while writing", True),
    )
    for n, (sig, name, while_writing) in enumerate(interruptions):
        process = build(work / f"cache-{n}")  # empty: the build has to embed
        if while_writing:
            deadline = time.monotonic() + 300
            while not scratch() and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.01)
        else:
            time.sleep(3.0)
        process.send_signal(sig)
        process.wait(timeout=60)
        manifest = IndexManifest.read(layout.index_dir)
        left = scratch()
        embedding_scratch = list((work / f"cache-{n}").rglob("*.tmp.npy"))
        row = {
            "build-index": name,
            "exit code": process.returncode,
            "old index in place": manifest.built_at == before,
            "scratch left": len(left) + len(embedding_scratch),
        }
        if left:
            build(work / "cache-warm").wait(timeout=300)
            row["after the next build"] = f"{len(scratch())} left"
            before = IndexManifest.read(layout.index_dir).built_at
        rows.append(row)
    return rows


def send_form_body(port: int, size: int) -> str:
    """POSTs a form-urlencoded body of `size` bytes, the request that crashes tritonserver
    2.51's HTTP servers (the metrics port's too); returns the reply's status line, or ""."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /v2/models/search/infer HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        with contextlib.suppress(OSError):  # may be refused part-way
            connection.sendall(b"q=" + b"x" * (size - 2))
        try:
            return connection.recv(64).decode(errors="replace").split("\r\n")[0]
        except OSError:
            return ""


def security(server: TritonServer) -> list[Row]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    rows = []
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        calls = {
            "statistics": lambda h: client.get_inference_statistics(headers=h),
            "model repository index": lambda h: client.get_model_repository_index(headers=h),
            "unload a model": lambda h: client.unload_model("no_such_model", headers=h),
            "log settings": lambda h: client.get_log_settings(headers=h),
            "trace settings": lambda h: client.get_trace_settings(headers=h),
            "shared-memory status": lambda h: client.get_system_shared_memory_status(headers=h),
        }
        for what, call in calls.items():
            outcome = {}
            for label, headers in (("without key", None), ("with key", server.admin_headers)):
                try:
                    call(headers)
                    outcome[label] = "allowed"
                except InferenceServerException as e:
                    outcome[label] = e.message()[:60]
            rows.append({"check": what, **outcome})
    try:
        socket.create_connection(("127.0.0.1", server.ports.http), timeout=3).close()
        http = "open"
    except OSError as e:
        http = f"{type(e).__name__} (off)"
    rows.append({"check": "HTTP port", "without key": http, "with key": ""})
    reply = send_form_body(server.ports.metrics, 4 << 20)
    time.sleep(1)
    rows.append(
        {
            "check": "4 MiB form body to port 8002",
            "without key": f"{reply}; server alive {server.process.poll() is None}, "
            f"ready {_ready(server)}",
            "with key": "",
        }
    )
    return rows


def markdown_table(rows: list[Row]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_chaos(repository: Path, catalog: Path, work: Path) -> dict[str, list[Row]]:
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, list[Row]] = {}
    with TritonServer.local(repository, work / "tritonserver.log") as server:
        report["bad input"] = bad_inputs(server)
        report["security"] = security(server)
        report["stub killed under load"] = stub_kills(server)
    report["launcher stopped or killed"] = launcher_kills(repository)
    report["index build interrupted"] = index_interrupts(catalog, repository, work)
    return report


def chaos_markdown(report: dict[str, list[Row]]) -> str:
    return "\n".join(f"## {title}\n\n{markdown_table(rows)}" for title, rows in report.items())
