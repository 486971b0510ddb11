"""`ecomsearch build-index`: embed a catalog and write a FAISS index directory atomically."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch.catalog import Product, product_text, read_catalog
from ecomsearch.contract import PRODUCT_MAX_TOKENS
from ecomsearch.encoder import OnnxEncoder
from ecomsearch.fingerprint import file_sha256, texts_sha256
from ecomsearch.index.atomic import publish_index_dir, remove_abandoned
from ecomsearch.index.manifest import (
    FAISS_FILE,
    IDS_FILE,
    KEYS_FILE,
    LEXICAL_DIR,
    MANIFEST_FILE,
    METADATA_FILE,
    IndexLoadError,
    IndexManifest,
)
from ecomsearch.lexical import LexicalIndex
from ecomsearch.live.location import STORE_URL_ENV
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.pids import process_alive

log = logging.getLogger(__name__)

# Product texts carry a title, a category and a spec-like description; PRODUCT_MAX_TOKENS (128)
# keeps all of a title and most descriptions while bounding the quadratic attention cost.
EMBEDDING_BATCH_SIZE = 64

# Exact inner-product search (IndexFlatIP) up to this many products, HNSW above. Measured with
# `ecomsearch bench-scaling` (one query, one core, k=200): flat 0.42 ms p99 at 10k but 9.4 ms
# at 100k, while HNSW answers 1M products in 1.2 ms p99 at recall@100 1.0 (synthetic clustered
# vectors). Exact search is kept where it is cheap; beyond ~50k its linear scan dominates.
EXACT_SEARCH_MAX_PRODUCTS = 50_000
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256
RECALL_K = 100
RECALL_SAMPLE_QUERIES = 200


@dataclass(frozen=True)
class BuildResult:
    manifest: IndexManifest
    index_dir: Path
    reused: bool


def choose_index_type(count: int, exact_max_products: int = EXACT_SEARCH_MAX_PRODUCTS) -> str:
    return "flat" if count <= exact_max_products else "hnsw"


def make_faiss_index(embeddings: np.ndarray, index_type: str) -> tuple[Any, dict[str, Any]]:
    import faiss

    dimension = embeddings.shape[1]
    if index_type == "flat":
        index, params = faiss.IndexFlatIP(dimension), {}
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        params = {
            "neighbours": HNSW_NEIGHBOURS,
            "ef_construction": HNSW_EF_CONSTRUCTION,
            "ef_search": HNSW_EF_SEARCH,
        }
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index, params


def recall_against_exact(
    index: Any, embeddings: np.ndarray, k: int = RECALL_K, sample: int = RECALL_SAMPLE_QUERIES
) -> float:
    """Recall@k of `index` versus exact search, queried with perturbed sampled product vectors
    (perturbed so a product is not trivially its own nearest neighbour)."""
    import faiss

    rng = np.random.default_rng(0)
    k = min(k, len(embeddings))
    picks = rng.choice(len(embeddings), size=min(sample, len(embeddings)), replace=False)
    queries = embeddings[picks] + rng.normal(0, 0.05, (len(picks), embeddings.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    exact = faiss.IndexFlatIP(embeddings.shape[1])
    exact.add(embeddings)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


# An embedding cache file being written: `<name>.<pid>.tmp.npy`.
SCRATCH_SUFFIX = ".tmp.npy"
_SCRATCH_PID = re.compile(rf"\.(\d+){re.escape(SCRATCH_SUFFIX)}$")


def _remove_abandoned_scratch(directory: Path) -> None:
    """Removes cache files left half-written by a process that is gone (killed with SIGKILL)."""
    for path in directory.glob(f"*{SCRATCH_SUFFIX}"):
        match = _SCRATCH_PID.search(path.name)
        if match and not process_alive(int(match[1])):
            path.unlink(missing_ok=True)


class EmbeddingCache:
    """Embeddings keyed by encoder fingerprint and the exact texts, so a rebuild is instant."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def path(self, encoder_fingerprint: str, texts_digest: str, max_tokens: int) -> Path:
        name = f"{texts_digest[:24]}-t{max_tokens}.npy"
        return self.cache_dir / "embeddings" / encoder_fingerprint[:24] / name

    def get_or_compute(self, encoder: OnnxEncoder, texts: list[str], max_tokens: int) -> np.ndarray:
        path = self.path(encoder.fingerprint, texts_sha256(texts), max_tokens)
        if path.is_file():
            cached = np.load(path)
            if cached.shape == (len(texts), encoder.dimension):
                log.info("embeddings: reused cache %s", path)
                return cached
        embeddings = encoder.encode(texts, batch_size=EMBEDDING_BATCH_SIZE, progress=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_scratch(path.parent)
        scratch = path.with_suffix(f".{os.getpid()}{SCRATCH_SUFFIX}")
        try:
            np.save(scratch, embeddings)
            os.replace(scratch, path)  # a reader never loads a half-written cache file
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise
        return embeddings


def _write_index_files(
    directory: Path,
    faiss_index: Any,
    products: list[Product],
    keys: np.ndarray,
    manifest: IndexManifest,
) -> None:
    """The index's files in `directory`; the manifest, with every other file's checksum, last."""
    import faiss

    faiss.write_index(faiss_index, str(directory / FAISS_FILE))
    LexicalIndex.build(products).save(directory / LEXICAL_DIR)
    (directory / IDS_FILE).write_text(json.dumps([p.id for p in products]), encoding="utf-8")
    np.save(directory / KEYS_FILE, np.asarray(keys, dtype=np.int64), allow_pickle=False)
    with open(directory / METADATA_FILE, "w", encoding="utf-8") as stream:
        for product in products:
            stream.write(json.dumps(product.metadata(), ensure_ascii=False) + "\n")
    checksums = {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
    manifest = IndexManifest(**{**manifest.__dict__, "file_sha256": checksums})
    (directory / MANIFEST_FILE).write_text(manifest.to_json())


@dataclass(frozen=True)
class CatalogSnapshot:
    """Everything an index is built from: products, their store keys and embeddings, and
    where they came from."""

    products: list[Product]
    keys: np.ndarray  # int64 [n]
    embeddings: np.ndarray  # float32 [n, dimension]
    encoder_fingerprint: str
    catalog_sha256: str  # of the catalog file last loaded into the store
    store_url: str | None = None
    store_id: str | None = None
    seq: int | None = None  # the store's change sequence number the products are at


def write_index(
    index_dir: Path,
    snapshot: CatalogSnapshot,
    exact_max_products: int = EXACT_SEARCH_MAX_PRODUCTS,
    started: float | None = None,
) -> IndexManifest:
    """Builds the FAISS and BM25 indexes of a snapshot and publishes them as the new version of
    `index_dir` in one atomic step (ecomsearch.index.atomic); returns the manifest written."""
    started = time.perf_counter() if started is None else started
    if not snapshot.products:
        raise ValueError("the catalog is empty: nothing to index")
    embeddings = np.ascontiguousarray(snapshot.embeddings, dtype=np.float32)
    index_type = choose_index_type(len(snapshot.products), exact_max_products)
    faiss_index, params = make_faiss_index(embeddings, index_type)
    recall = None
    if index_type != "flat":
        recall = recall_against_exact(faiss_index, embeddings)
        log.info(
            "%s recall@%d against exact search on %d sampled queries: %.4f",
            index_type,
            RECALL_K,
            RECALL_SAMPLE_QUERIES,
            recall,
        )
    manifest = IndexManifest(
        encoder_fingerprint=snapshot.encoder_fingerprint,
        dimension=int(embeddings.shape[1]),
        count=len(snapshot.products),
        index_type=index_type,
        index_params=params,
        catalog_sha256=snapshot.catalog_sha256,
        text_max_tokens=PRODUCT_MAX_TOKENS,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - started, 3),
        recall_at_100=recall,
        catalog_store=snapshot.store_url,
        catalog_store_id=snapshot.store_id,
        catalog_seq=snapshot.seq,
    )
    publish_index_dir(
        index_dir,
        lambda directory: _write_index_files(
            directory, faiss_index, snapshot.products, snapshot.keys, manifest
        ),
    )
    log.info(
        "index: %d products, %s, dimension %d, at change %s, built in %.1f s -> %s",
        manifest.count,
        index_type,
        manifest.dimension,
        manifest.catalog_seq,
        time.perf_counter() - started,
        index_dir,
    )
    return IndexManifest.read(index_dir)


def store_snapshot(store: Any, catalog_sha256: str) -> CatalogSnapshot:
    """Every live product of a catalog store, with its embedding, at one change number."""
    from ecomsearch.store import catalog_product

    seq, records = store.snapshot(with_embeddings=True)
    if not records:
        raise ValueError(f"the catalog store {store.url} has no products")
    return CatalogSnapshot(
        products=[catalog_product(r) for r in records],
        keys=np.array([r.key for r in records], dtype=np.int64),
        embeddings=np.stack([r.embedding for r in records]).astype(np.float32, copy=False),
        encoder_fingerprint=store.encoder_fingerprint,
        catalog_sha256=catalog_sha256,
        store_url=store.url,
        store_id=store.store_id,
        seq=seq,
    )


# The store remembers the catalog file it was last loaded from, so serving the same file again
# (`make serve` twice) keeps the live changes made since instead of loading the file over them.
LOADED_CATALOG_META = "loaded_catalog_sha256"


# Store-wide lock held while a catalog file is loaded (CatalogStore.exclusive).
CATALOG_LOAD_LOCK = "catalog-load"


def load_catalog_into_store(
    store: Any, catalog_path: Path, encoder: OnnxEncoder, cache: EmbeddingCache
) -> bool:
    """Makes the store's catalog the file's, as changes (upserts of every product, deletes of
    products the file lacks), unless the store was last loaded from this very file; re-embeds
    stored products first if the store's embeddings come from another encoder. Returns whether
    the store changed.

    The whole of it holds the store's CATALOG_LOAD_LOCK: replicas starting together (each
    pod's init step) load a file once, the others finding it loaded when the lock is theirs,
    instead of each upserting the file again over the live changes made since the first."""
    with store.exclusive(CATALOG_LOAD_LOCK):
        return _load_catalog_into_store(store, catalog_path, encoder, cache)


def _load_catalog_into_store(
    store: Any, catalog_path: Path, encoder: OnnxEncoder, cache: EmbeddingCache
) -> bool:
    changed = False
    if store.encoder_fingerprint not in (None, encoder.fingerprint):
        seq, records = store.snapshot(with_embeddings=False)
        embeddings_by_key: dict[int, np.ndarray] = {}
        if records:
            from ecomsearch.store import catalog_product

            texts = [product_text(catalog_product(r)) for r in records]
            embeddings = cache.get_or_compute(encoder, texts, PRODUCT_MAX_TOKENS)
            embeddings_by_key = {r.key: e for r, e in zip(records, embeddings, strict=True)}
        log.info("store %s: re-embedding %d products", store.url, len(records))
        # Even with no live product left: the store refuses writes from another encoder until
        # its recorded encoder is this one.
        store.reembed(encoder.fingerprint, embeddings_by_key, at_seq=seq)
        changed = True
    catalog_sha256 = file_sha256(catalog_path)
    if store.get_meta(LOADED_CATALOG_META) == catalog_sha256:
        return changed
    products = read_catalog(catalog_path)
    log.info("catalog %s: %d products, loading into %s", catalog_path, len(products), store.url)
    embeddings = cache.get_or_compute(
        encoder, [product_text(p) for p in products], PRODUCT_MAX_TOKENS
    )
    from ecomsearch.store import product_write

    store.upsert([product_write(p) for p in products], embeddings, encoder.fingerprint)
    file_ids = {p.id for p in products}
    _, records = store.snapshot(with_embeddings=False)
    gone = [r.id for r in records if r.id not in file_ids]
    if gone:
        store.delete(gone)
    store.set_meta(LOADED_CATALOG_META, catalog_sha256)
    return True


def build_index(
    catalog_path: Path,
    layout: ModelRepositoryLayout,
    cache_dir: Path,
    index_dir: Path | None = None,
    force: bool = False,
    exact_max_products: int = EXACT_SEARCH_MAX_PRODUCTS,
    store_url: str | None = None,
) -> BuildResult:
    """Loads a catalog file into the catalog store (see load_catalog_into_store) and builds the
    served index from the store, recording the change number it is at; skips the work when the
    index already matches the store, the encoder and the index type."""
    from ecomsearch.store import open_store

    started = time.perf_counter()
    index_dir = index_dir or layout.index_dir
    remove_abandoned(index_dir)  # even when the index turns out up to date
    encoder = OnnxEncoder(layout.encoder_onnx, layout.tokenizer_dir, PRODUCT_MAX_TOKENS)
    store_url = store_url or default_store_url(layout)
    with open_store(store_url) as store:
        load_catalog_into_store(store, catalog_path, encoder, EmbeddingCache(cache_dir))
        if not force:
            try:
                existing = IndexManifest.read(index_dir)
            except IndexLoadError:
                existing = None
            if (
                existing is not None
                and existing.encoder_fingerprint == encoder.fingerprint
                and existing.catalog_store_id == store.store_id
                and existing.catalog_seq == store.head()
                and existing.text_max_tokens == PRODUCT_MAX_TOKENS
                and existing.index_type == choose_index_type(existing.count, exact_max_products)
            ):
                log.info("index at %s is up to date with %s", index_dir, store.url)
                return BuildResult(existing, index_dir, reused=True)
        snapshot = store_snapshot(store, store.get_meta(LOADED_CATALOG_META) or "")
    manifest = write_index(index_dir, snapshot, exact_max_products, started)
    return BuildResult(manifest, index_dir, reused=False)


def default_store_url(layout: ModelRepositoryLayout) -> str:
    """`$ECOMSEARCH_STORE_URL`, else the SQLite file of the repository's data directory."""
    return os.environ.get(STORE_URL_ENV) or f"sqlite:///{layout.catalog_store_path.resolve()}"
