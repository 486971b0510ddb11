"""`ecomsearch bench`: the served ensemble, the same models in-process, and a naive baseline,
measured side by side in one run, on one catalog, with the same queries."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ecomsearch import contract
from ecomsearch.loadtest.load import closed_loop
from ecomsearch.loadtest.report import (
    BATCHING_COMPARISON_CONCURRENCY,
    FLOOR_PASSES,
    BenchReport,
    write_report,
)
from ecomsearch.loadtest.triton_stats import breakdown, snapshot

if TYPE_CHECKING:
    from ecomsearch.pipeline import InProcessPipeline

log = logging.getLogger(__name__)

SYSTEMS = ("triton", "triton_no_batching", "in_process", "naive")
DEFAULT_CONCURRENCIES = (1, 4, 16, 64)


@dataclass
class BenchSettings:
    concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES
    max_requests: int = 1500
    max_seconds: float = 20.0
    top_k: int = contract.DEFAULT_TOP_K
    systems: Sequence[str] = SYSTEMS
    # Batching off is compared at this concurrency only (the target's), unless told otherwise.
    no_batching_concurrencies: Sequence[int] = (BATCHING_COMPARISON_CONCURRENCY,)
    # The served ensemble to load: `search`, or `search_unranked` to price the ranker.
    ensemble: str = contract.SEARCH_MODEL
    # The model-config profile served (None: the default, CPU one; "gpu": configs/gpu.pbtxt),
    # and the one the in-process pipeline and the naive baseline mirror.
    profile: str | None = None


def triton_worker_factory(url: str, model_name: str, k: int, clients: list):
    import tritonclient.grpc as grpcclient

    from ecomsearch.client import protocol

    outputs = protocol.build_outputs(grpcclient)

    def factory():
        client = grpcclient.InferenceServerClient(url)
        clients.append(client)
        prepared: dict[str, list] = {}

        def call(query: str):
            inputs = prepared.get(query)
            if inputs is None:
                inputs = prepared[query] = protocol.build_inputs(grpcclient, [query], k)
            return client.infer(model_name, inputs, outputs=outputs, client_timeout=60)

        return call

    return factory


def rewrite_configs(repository: Path, edit: Callable[[str, object], None]) -> list[Path]:
    """Passes every config of `repository` (every profile's) through `edit(model name,
    ModelConfig)` via Triton's protobuf, in place; writes back and returns those it changed."""
    from google.protobuf import text_format

    from ecomsearch.paths import ModelRepositoryLayout, read_model_config

    changed = []
    for path in ModelRepositoryLayout(repository).config_files():
        config = read_model_config(path)
        before = config.SerializeToString(deterministic=True)
        edit(config.name, config)
        if config.SerializeToString(deterministic=True) != before:
            path.write_text(text_format.MessageToString(config))
            changed.append(path)
    return changed


def rewritten_repository(source: Path, target: Path, edit: Callable[[str, object], None]) -> Path:
    """A copy of a model repository whose configs went through `edit` (see rewrite_configs):
    its checked-in files copied, its exported models and served index linked."""
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.workspace import link_model_repository

    shutil.rmtree(target, ignore_errors=True)
    link_model_repository(source, target)
    index = ModelRepositoryLayout(source).index_dir.resolve()
    if not index.is_dir():
        raise FileNotFoundError(f"{index} missing: build the index first (`make index`)")
    ModelRepositoryLayout(target).index_dir.symlink_to(index, target_is_directory=True)
    rewrite_configs(target, edit)
    return target


def without_dynamic_batching(source: Path, target: Path) -> Path:
    """A copy of a model repository with dynamic batching removed from every model."""
    return rewritten_repository(
        source, target, lambda _, config: config.ClearField("dynamic_batching")
    )


@contextmanager
def served(repository: Path, log_path: Path, profile: str | None = None):
    from ecomsearch.server.launcher import TritonServer

    # No response cache (no shipped config enables one; `ecomsearch bench-cache` measures it).
    with TritonServer.local(repository, log_path, model_config_name=profile) as server:
        yield server


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs `nvidia-smi -L` lists (none without the driver)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]


def bench_triton(report, server, system, queries, concurrencies, settings) -> None:
    from ecomsearch.server.processes import cpu_seconds_by_process

    url, admin_headers = server.grpc_url, server.admin_headers
    clients: list = []
    factory = triton_worker_factory(url, settings.ensemble, settings.top_k, clients)
    try:
        for concurrency in concurrencies:
            before = snapshot(url, admin_headers)
            cpu_before = cpu_seconds_by_process(server.process.pid)  # its own process group
            client_before = time.process_time()
            result = closed_loop(
                system, factory, queries, concurrency, settings.max_requests, settings.max_seconds
            )
            # The server's CPU time (tritonserver and every stub) per answered request; the
            # closed loop's warm-up requests are in it too, a handful among thousands. The
            # load generator's own (this process: gRPC clients in Python threads) shares the
            # same cores, so it is reported beside it.
            cpu_after = cpu_seconds_by_process(server.process.pid)
            client_s = time.process_time() - client_before
            per_request = 1000 / result.requests if result.requests else 0.0
            by_process = {
                name: round((seconds - cpu_before.get(name, 0.0)) * per_request, 3)
                for name, seconds in cpu_after.items()
            }
            stages = breakdown(before, snapshot(url, admin_headers))
            for name, stage in stages.items():
                stage["server_cpu_ms_per_request"] = by_process.get(name)
            report.add(
                result,
                stages,
                sum(by_process.values()) if result.requests else None,
                client_s * per_request if result.requests else None,
                by_process,
            )
    finally:
        for client in clients:
            client.close()


def bench_local(report, system, pipeline, queries, concurrencies, settings) -> None:
    def factory():
        return lambda query: pipeline.search([query], settings.top_k)

    for concurrency in concurrencies:
        report.add(
            closed_loop(
                system, factory, queries, concurrency, settings.max_requests, settings.max_seconds
            )
        )


# The batch sizes at which the in-process pipeline's own compute is priced: one query, the
# 2-4 rows dynamic batching forms at the target's concurrency here, and a full batch.
FLOOR_BATCH_SIZES = (1, 4, 16)


def compute_floor(
    pipeline: InProcessPipeline,
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = FLOOR_BATCH_SIZES,
    passes: int = FLOOR_PASSES,
) -> dict[int, dict[str, float]]:
    """CPU ms per query of each stage of the in-process pipeline over `queries` in consecutive
    batches of each size, the best of `passes` passes (by their total): the work the served
    stages do, without Triton, its hops or other processes. A serving figure below this total
    is not reachable by serving changes; the served figure minus it is what serving costs."""
    floor: dict[int, dict[str, float]] = {}
    for batch_size in batch_sizes:
        batches = [
            queries[start : start + batch_size]
            for start in range(0, len(queries) - batch_size + 1, batch_size)
        ]
        if not batches:
            continue
        rows = len(batches) * batch_size
        best: dict[str, float] | None = None
        for _ in range(passes):
            stage_cpu_s: dict[str, float] = {}
            for batch in batches:
                pipeline.search(batch, k, stage_cpu_s=stage_cpu_s)
            per_query_ms = {stage: 1000 * s / rows for stage, s in stage_cpu_s.items()}
            if best is None or sum(per_query_ms.values()) < sum(best.values()):
                best = per_query_ms
        floor[batch_size] = {stage: round(ms, 3) for stage, ms in best.items()}
    return floor


def served_config(repository: Path, model: str, profile: str | None) -> dict:
    """A model's config for `profile` in the JSON form Triton hands a Python model, so the
    models' own parameter readers apply to it."""
    from google.protobuf import json_format

    from ecomsearch.paths import ModelRepositoryLayout, read_model_config

    config = read_model_config(ModelRepositoryLayout(repository).config_path(model, profile))
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def served_encoder_threads(repository: Path, profile: str | None) -> int:
    """The intra-op threads each served encoder instance runs with, read as the ONNX Runtime
    drop-in reads them (0, ONNX Runtime's default, when unset)."""
    from ecomsearch.serving.base import int_parameter

    config = served_config(repository, contract.ENCODER_MODEL, profile)
    return int_parameter(config, "intra_op_thread_count", 0)


@contextmanager
def served_thread_settings(repository: Path, profile: str | None):
    """The native thread pools as the served models set theirs, for the in-process pipeline
    (restored on exit, so the naive baseline keeps its own): BLAS and the tokenizers as every
    Python model limits them (ecomsearch.serving.base), FAISS's OpenMP at retrieve's configured
    `faiss_omp_threads`; yields the encoder's intra-op threads. With the libraries' defaults
    instead (a pool of two threads in each, spinning while idle, on two cores), the in-process
    pipeline's p50 at concurrency 1 moved between 4.7 and 12 ms from run to run here."""
    import faiss

    from ecomsearch.serving.base import native_threads_limited
    from ecomsearch.serving.retrieve import RetrieveSettings

    retrieve = RetrieveSettings.from_config(
        served_config(repository, contract.RETRIEVE_MODEL, profile)
    )
    omp_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(retrieve.faiss_omp_threads)
    try:
        with native_threads_limited(1):
            yield served_encoder_threads(repository, profile)
    finally:
        faiss.omp_set_num_threads(omp_threads)


def run_bench(
    repository: Path, queries: Sequence[str], out_dir: Path, settings: BenchSettings
) -> BenchReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BenchReport(
        settings={
            "repository": str(repository),
            "queries": len(queries),
            "concurrencies": list(settings.concurrencies),
            "max_requests": settings.max_requests,
            "max_seconds": settings.max_seconds,
            "top_k": settings.top_k,
            "ensemble": settings.ensemble,
            "profile": settings.profile or "cpu",
        }
    )
    # One system at a time: they share two cores, and a measurement must not pay for another.
    if "triton" in settings.systems:
        with served(repository, out_dir / "tritonserver.log", settings.profile) as server:
            bench_triton(report, server, "triton", queries, settings.concurrencies, settings)
    if "triton_no_batching" in settings.systems:
        unbatched = without_dynamic_batching(repository, out_dir / "repository-no-batching")
        with served(
            unbatched, out_dir / "tritonserver-no-batching.log", settings.profile
        ) as server:
            bench_triton(
                report,
                server,
                "triton_no_batching",
                queries,
                settings.no_batching_concurrencies,
                settings,
            )
    if "in_process" in settings.systems:
        from ecomsearch.pipeline import InProcessPipeline

        # The same speed-ups as the served pipeline, thread settings included: the ratio at
        # concurrency 1 then prices Triton's hops, not two threads against one.
        with served_thread_settings(repository, settings.profile) as encoder_threads:
            pipeline = InProcessPipeline(
                repository, encoder_threads=encoder_threads, profile=settings.profile
            )
            bench_local(report, "in_process", pipeline, queries, settings.concurrencies, settings)
            report.compute_floor = compute_floor(pipeline, queries, settings.top_k)
    if "naive" in settings.systems:
        from ecomsearch.loadtest.baseline import NaivePipeline

        device = "cuda" if settings.profile == "gpu" else "cpu"
        bench_local(
            report,
            "naive",
            NaivePipeline(repository, device=device),
            queries,
            settings.concurrencies,
            settings,
        )
    write_report(report, out_dir)
    return report


def load_queries(path: Path, limit: int | None = None) -> list[str]:
    """One query a line, or the distinct queries of a judgments CSV (query,product_id,...)."""
    if path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as stream:
            queries = list(dict.fromkeys(row["query"] for row in csv.DictReader(stream)))
    else:
        queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries[:limit] if limit else queries
