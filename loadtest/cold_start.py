"""`ecomsearch bench-cold-start`: what a fresh server's first requests cost, with the model
repository's `model_warmup` and without it.

Each repeat starts one fresh tritonserver per condition, the conditions interleaved (their order
alternates from one repeat to the next, so a drift in the machine's load favours neither):

- `with`: a copy of the repository with its configs as they are;
- `without`: the same copy with every config's `model_warmup` removed (through Triton's
  protobuf, every profile's config);
- `without <models>` (optional, `--strip-only`): only those models' warm-up removed, to price
  one model's warm-up against the others'.

On each server: the time from start to ready (the launcher's, polled every 0.25 s, and the
server log's, from the first model's load to the gRPC service starting); the first `search`
request, the second (query_encoder has two instances, and the second request may be the first
on the other) and the median of the next ones; then the first `recommend`, the first `similar`
(of a product the first search found), and the first two searches with a rerank (select's
first calls of the cross-encoder). Triton's statistics, read before and after each of those
requests, give the time each model spent on it (queue and compute): which stage is slow on its
first request. Read as the server becomes ready, they also give the compute time of each
model's warm-up (tritonserver counts warm-up requests in its statistics).

Nothing here writes to the catalog store: the servers only read it, as every warm-up does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecomsearch import contract
from ecomsearch.loadtest.bench import rewrite_configs, rewritten_repository
from ecomsearch.paths import ModelRepositoryLayout, read_model_config

log = logging.getLogger(__name__)

WITH = "with"
WITHOUT = "without"
# The models each first request goes through, in pipeline order (ensembles aside).
SEARCH_STAGES = (
    contract.PREPROCESS_MODEL,
    contract.ENCODER_MODEL,
    contract.RETRIEVE_MODEL,
    contract.RANKER_MODEL,
    contract.SELECT_MODEL,
)
RECOMMEND_STAGES = (
    contract.RECOMMEND_CANDIDATES_MODEL,
    contract.RECOMMEND_RANKER_MODEL,
    contract.SELECT_MODEL,
)
SIMILAR_STAGES = (contract.SIMILAR_CANDIDATES_MODEL, contract.SELECT_MODEL)
RERANK_STAGES = (contract.SELECT_MODEL, contract.CROSS_ENCODER_MODEL)
# A shopper nobody has seen: `recommend` answers with the popular products.
PROBE_USER = "cold-start-probe"
RERANK_DEPTH = 32


@dataclass(frozen=True)
class ColdStartSettings:
    repeats: int = 5
    # Requests after the first two whose median is the steady state.
    steady_requests: int = 30
    # A first request may take long; the client's default 2 s deadline would cut it short.
    timeout_s: float = 60.0
    # Models whose warm-up alone is removed in a third condition (empty: no such condition).
    strip_only: tuple[str, ...] = ()
    # The model-config profile served (None: config.pbtxt; "gpu": configs/gpu.pbtxt).
    profile: str | None = None


# --- Repositories with and without warm-up (pure parts, unit-tested) -------------------------


def strip_warmup(config, models: Collection[str] | None = None) -> bool:
    """Removes `config`'s model_warmup (a ModelConfig) if it is one of `models` (None: any);
    True if it had one."""
    if models is not None and config.name not in models:
        return False
    had = len(config.model_warmup) > 0
    config.ClearField("model_warmup")
    return had


def without_warmup(repository: Path, models: Collection[str] | None = None) -> list[Path]:
    """Removes the warm-up of `models` (None: every model) from the repository's configs, in
    place; returns the configs changed."""
    return rewrite_configs(repository, lambda _, config: strip_warmup(config, models))


def warmups(repository: Path) -> dict[str, list[str]]:
    """Each config's warm-up samples by name ("<model>" or "<model> (<profile>)")."""
    found = {}
    for path in ModelRepositoryLayout(repository).config_files():
        config = read_model_config(path)
        if config.model_warmup:
            label = config.name if path.name == "config.pbtxt" else f"{config.name} ({path.stem})"
            found[label] = [sample.name for sample in config.model_warmup]
    return found


# --- Statistics and the server log (pure parts) -----------------------------------------------


def _spent_ns(counters: dict, start: dict) -> int:
    return sum(
        counters[key] - start.get(key, 0)
        for key in ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")
    )


def warmup_times_ms(at_ready: dict) -> dict[str, float]:
    """Per model, the compute time of its warm-up executions (every instance's, each execution
    counted once, not once per request of its batch), from the statistics of a server no client
    has sent a request yet: tritonserver counts the warm-up requests."""
    return {
        name: round(counters["execution_compute_ns"] / 1e6, 3)
        for name, counters in at_ready.items()
        if counters["requests"] > 0
    }


def model_times_ms(before: dict, after: dict) -> dict[str, float]:
    """Per model, the mean time one request spent in it between two statistics snapshots
    (ecomsearch.loadtest.triton_stats.snapshot): queue plus compute, milliseconds."""
    times = {}
    for name, end in after.items():
        start = before.get(name, {})
        requests = end["requests"] - start.get("requests", 0)
        if requests <= 0:
            continue
        times[name] = round(_spent_ns(end, start) / requests / 1e6, 3)
    return times


_LOG_TIME = re.compile(r"^[IWE]\d{4} (\d{2}):(\d{2}):(\d{2}\.\d+) ")


def _seconds_of_day(line: str) -> float | None:
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def log_load_seconds(log_text: str) -> float | None:
    """From a tritonserver log: the first model's "loading:" line to "Started
    GRPCInferenceService" (every model loaded and warmed up), seconds; None if either is
    missing."""
    start = end = None
    for line in log_text.splitlines():
        if start is None and '"loading: ' in line:
            start = _seconds_of_day(line)
        elif "Started GRPCInferenceService" in line:
            end = _seconds_of_day(line)
            break
    if start is None or end is None:
        return None
    if end < start:  # past midnight
        end += 24 * 3600
    return round(end - start, 3)


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max; None for no values."""
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def summarise(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, float] | None]]:
    """Per condition, per measure: summary() over the repeats (measures missing from a run, a
    model a request did not reach, are left out)."""
    by_condition: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        measures = by_condition.setdefault(run["condition"], {})
        for key, value in run["measures"].items():
            if value is not None:
                measures.setdefault(key, []).append(value)
    return {
        condition: {key: summary(values) for key, values in measures.items()}
        for condition, measures in by_condition.items()
    }


def condition_order(conditions: Sequence[str], repeat: int) -> list[str]:
    """The conditions in order on even repeats, reversed on odd ones."""
    return list(conditions) if repeat % 2 == 0 else list(reversed(conditions))


# --- Measuring one fresh server ----------------------------------------------------------------


def _timed(server, call: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    """call()'s result, its latency (ms) and each model's time on it (Triton's statistics)."""
    from ecomsearch.loadtest.triton_stats import snapshot

    before = snapshot(server.grpc_url, server.admin_headers)
    started = time.perf_counter()
    result = call()
    elapsed_ms = (time.perf_counter() - started) * 1000
    after = snapshot(server.grpc_url, server.admin_headers)
    return result, round(elapsed_ms, 3), model_times_ms(before, after)


def _record(measures: dict, prefix: str, latency_ms: float, models: dict, stages) -> None:
    measures[f"{prefix}.ms"] = latency_ms
    for stage in stages:
        measures[f"{prefix}.{stage}.ms"] = models.get(stage)


def measure_server(
    repository: Path, log_path: Path, queries: Sequence[str], settings: ColdStartSettings
) -> dict[str, float | None]:
    """Starts a fresh server over `repository` and measures its first requests (see the module
    docstring); returns the measures by name."""
    from ecomsearch.client import SearchClient
    from ecomsearch.loadtest.triton_stats import snapshot
    from ecomsearch.server.launcher import TritonServer

    log_path.unlink(missing_ok=True)
    server = TritonServer.local(repository, log_path, model_config_name=settings.profile)
    started = time.perf_counter()
    server.start()
    measures: dict[str, float | None] = {"load.s": round(time.perf_counter() - started, 3)}
    try:
        measures["load_log.s"] = log_load_seconds(log_path.read_text(errors="replace"))
        at_ready = snapshot(server.grpc_url, server.admin_headers)
        for model, ms in warmup_times_ms(at_ready).items():
            measures[f"warmup.{model}.ms"] = ms
        with SearchClient(server.grpc_url, timeout_s=settings.timeout_s) as client:
            client.wait_until_ready()  # the channel is up before the first timed request
            hits, ms, models = _timed(server, lambda: client.search(queries[0]))
            _record(measures, "search.first", ms, models, SEARCH_STAGES)
            _, ms, models = _timed(server, lambda: client.search(queries[1]))
            _record(measures, "search.second", ms, models, SEARCH_STAGES)
            before = snapshot(server.grpc_url, server.admin_headers)
            latencies = []
            for i in range(settings.steady_requests):
                query = queries[2 + i % (len(queries) - 2)]
                begun = time.perf_counter()
                client.search(query)
                latencies.append((time.perf_counter() - begun) * 1000)
            steady = model_times_ms(before, snapshot(server.grpc_url, server.admin_headers))
            _record(measures, "search.steady", statistics.median(latencies), steady, SEARCH_STAGES)
            _, ms, models = _timed(server, lambda: client.recommend(PROBE_USER))
            _record(measures, "recommend.first", ms, models, RECOMMEND_STAGES)
            product_id = hits[0].product_id
            _, ms, models = _timed(server, lambda: client.similar(product_id))
            _record(measures, "similar.first", ms, models, SIMILAR_STAGES)
            _, ms, models = _timed(
                server, lambda: client.search(queries[0], rerank_depth=RERANK_DEPTH)
            )
            _record(measures, "rerank.first", ms, models, RERANK_STAGES)
            _, ms, models = _timed(
                server, lambda: client.search(queries[1], rerank_depth=RERANK_DEPTH)
            )
            _record(measures, "rerank.second", ms, models, RERANK_STAGES)
    finally:
        server.stop()
    return measures


# --- The run ---------------------------------------------------------------------------------


def load_queries() -> list[str]:
    from ecomsearch.paths import default_queries

    lines = default_queries().read_text(encoding="utf-8").splitlines()
    queries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(queries) < 3:
        raise ValueError("the benchmark queries file has fewer than 3 queries")
    return queries


def run_cold_start(
    repository: Path, out_dir: Path, settings: ColdStartSettings, command: str | None = None
) -> dict:
    """Measures every condition `settings.repeats` times, interleaved; writes cold_start.json
    (every run) and cold_start.md (the table, ending with `command` when given) to `out_dir`,
    with each server's log in out_dir/logs, and returns the report. The repository copies it
    serves are removed at the end."""
    if settings.repeats < 1:
        raise ValueError("repeats must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = load_queries()
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    copies = out_dir / "repositories"
    try:
        strip_only = set(settings.strip_only)
        repositories = {
            WITH: rewritten_repository(repository, copies / "with", lambda *_: None),
            WITHOUT: rewritten_repository(
                repository, copies / "without", lambda _, config: strip_warmup(config)
            ),
        }
        if strip_only:
            repositories[f"without {','.join(settings.strip_only)}"] = rewritten_repository(
                repository, copies / "partial", lambda _, config: strip_warmup(config, strip_only)
            )
        warmed = warmups(repositories[WITH])
        runs = []
        for repeat in range(settings.repeats):
            for condition in condition_order(list(repositories), repeat):
                slug = condition.replace(" ", "-").replace(",", "+")
                measures = measure_server(
                    repositories[condition], logs / f"{slug}-{repeat}.log", queries, settings
                )
                runs.append({"condition": condition, "repeat": repeat, "measures": measures})
                log.info(
                    "%s #%d: ready in %.2f s, first search %.1f ms, second %.1f ms, steady %.1f ms",
                    condition,
                    repeat,
                    measures["load.s"],
                    measures["search.first.ms"],
                    measures["search.second.ms"],
                    measures["search.steady.ms"],
                )
    finally:
        shutil.rmtree(copies, ignore_errors=True)
    report = {
        "command": command,
        "repository": str(repository),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "settings": asdict(settings),
        "warmups": warmed,
        "conditions": list(repositories),
        "summary": summarise(runs),
        "runs": runs,
    }
    (out_dir / "cold_start.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "cold_start.md").write_text(markdown(report))
    return report


# The models that may have a warm-up, for its rows (a model's row shows only if it ran one).
WARMUP_ROWS = (
    contract.PREPROCESS_MODEL,
    contract.ENCODER_MODEL,
    contract.RETRIEVE_MODEL,
    contract.RANKER_MODEL,
    contract.SELECT_MODEL,
    contract.RECOMMEND_CANDIDATES_MODEL,
    contract.RECOMMEND_RANKER_MODEL,
    contract.SIMILAR_CANDIDATES_MODEL,
    contract.CROSS_ENCODER_MODEL,
)
# Rows of the table: measure, label.
ROWS = (
    ("load.s", "server start to ready (launcher, polled every 0.25 s), s"),
    ("load_log.s", "models loading to gRPC up (server log), s"),
    *(
        (f"warmup.{model}.ms", f"  warm-up at load: {model} (compute, all instances), ms")
        for model in WARMUP_ROWS
    ),
    ("search.first.ms", "**search: first request, ms**"),
    *((f"search.first.{stage}.ms", f"  {stage}") for stage in SEARCH_STAGES),
    ("search.second.ms", "**search: second request, ms**"),
    *((f"search.second.{stage}.ms", f"  {stage}") for stage in SEARCH_STAGES),
    ("search.steady.ms", "**search: steady state (median of the next requests), ms**"),
    *((f"search.steady.{stage}.ms", f"  {stage} (mean)") for stage in SEARCH_STAGES),
    ("recommend.first.ms", "**recommend: first request, ms**"),
    *((f"recommend.first.{stage}.ms", f"  {stage}") for stage in RECOMMEND_STAGES),
    ("similar.first.ms", "**similar: first request, ms**"),
    *((f"similar.first.{stage}.ms", f"  {stage}") for stage in SIMILAR_STAGES),
    ("rerank.first.ms", f"**search with rerank_depth {RERANK_DEPTH}: first, ms**"),
    *((f"rerank.first.{stage}.ms", f"  {stage}") for stage in RERANK_STAGES),
    ("rerank.second.ms", f"**search with rerank_depth {RERANK_DEPTH}: second, ms**"),
    *((f"rerank.second.{stage}.ms", f"  {stage}") for stage in RERANK_STAGES),
)


def _cell(value: dict[str, float] | None) -> str:
    if value is None:
        return ""
    return f"{value['median']:.1f} ({value['min']:.1f}-{value['max']:.1f})"


def markdown(report: dict) -> str:
    conditions = report["conditions"]
    settings = report["settings"]
    lines = [
        "# Cold start: first requests with and without model warm-up",
        "",
        f"{settings['repeats']} fresh servers per condition, interleaved, on "
        f"{report['cpus']} CPUs, profile {settings.get('profile') or 'default (CPU)'}; "
        f"{report['created']}. Each cell: median (min-max) over the "
        f"repeats. A model's row is the time one request spent in it (queue and compute, "
        f"Triton's statistics); the steady state is the median of {settings['steady_requests']} "
        "sequential searches after the first two.",
        "",
        "Warm-up in the `with` repository: "
        + "; ".join(
            f"{model}: {', '.join(samples)}" for model, samples in report["warmups"].items()
        )
        + ".",
        "",
        "| measure | " + " | ".join(f"`{c}`" for c in conditions) + " |",
        "|---|" + "---|" * len(conditions),
    ]
    summaries = report["summary"]
    for key, label in ROWS:
        cells = [_cell(summaries.get(c, {}).get(key)) for c in conditions]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report.get("command"):
        lines += ["", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"
