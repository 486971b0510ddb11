"""The `catalog` model: upserts and deletes of the live catalog, one store transaction a request.

Each request is one write, validated whole before anything is done: a bad product fails its
request (INVALID_ARG) and nothing of it is written, while the other requests of the same
`execute` are written as usual. An upsert embeds only the products whose embedded text is new
or changed (a price or stock change reuses the stored embedding), on the served models through
BLS (`preprocess` at PRODUCT_MAX_TOKENS, then `query_encoder`), so the GPU profile embeds on the
GPU. The write is committed before the answer names its sequence number: an acknowledged write
is durable, and a search instance that has followed the change log up to that number sees it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.catalog import CatalogError, Product, parse_product_writes
from ecomsearch.catalog import product_text as catalog_product_text
from ecomsearch.errors import RequestError
from ecomsearch.fingerprint import file_sha256
from ecomsearch.live.location import WRITE_KEY_ENV
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.query import visible_text
from ecomsearch.serving.base import input_array
from ecomsearch.serving.writes import StoreWriter, byte_strings
from ecomsearch.store import (
    ProductWrite,
    StoredProduct,
    WriteResult,
    catalog_product,
    product_write,
)

# Embeds texts: float32 [len(texts), dimension]; raises EmbeddingError when it cannot.
Embedder = Callable[[Sequence[str]], np.ndarray]


class EmbeddingError(Exception):
    """The write's products cannot be embedded: a served model failed, or the store holds
    another encoder's embeddings. `code` is the TritonError code the writer gets: UNAVAILABLE
    when a retry may succeed (the encoder shed the work, an encoder change is under way)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def product_text(record: StoredProduct | ProductWrite) -> str:
    """The text embedded for a product as the store holds it (a write or the stored version),
    the way build-index sees it, so the two compare equal exactly when the encoder would see
    the same text."""
    return catalog_product_text(catalog_product(record))


def encoder_text(text: str) -> str:
    """What `preprocess` accepts of a product's text: visible characters, at most
    MAX_QUERY_BYTES of them (cut at a character boundary). PRODUCT_MAX_TOKENS tokens take far
    fewer bytes, so the cut loses nothing the encoder would have seen."""
    text = visible_text(text)
    data = text.encode("utf-8")
    if len(data) <= contract.MAX_QUERY_BYTES:
        return text
    return data[: contract.MAX_QUERY_BYTES].decode("utf-8", errors="ignore").rstrip()


class BlsEmbedder:
    """Embeds product text on the served models: `preprocess` (with `max_tokens`) then
    `query_encoder`, in requests of at most MAX_QUERIES_PER_REQUEST texts."""

    def __init__(self, pb_utils, max_tokens: int = contract.PRODUCT_MAX_TOKENS) -> None:
        self.pb_utils = pb_utils
        self.max_tokens = max_tokens

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        size = contract.MAX_QUERIES_PER_REQUEST
        chunks = [self._embed(texts[start : start + size]) for start in range(0, len(texts), size)]
        return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        queries = np.empty((len(texts), 1), dtype=np.object_)
        queries[:, 0] = [encoder_text(text).encode("utf-8") for text in texts]
        tokens = self._infer(
            contract.PREPROCESS_MODEL,
            {
                contract.QUERY: queries,
                contract.MAX_TOKENS: np.full((len(texts), 1), self.max_tokens, dtype=np.int32),
            },
            [contract.INPUT_IDS, contract.ATTENTION_MASK],
        )
        (embedding,) = self._infer(contract.ENCODER_MODEL, tokens, [contract.EMBEDDING]).values()
        if embedding.ndim != 2 or len(embedding) != len(texts):
            raise EmbeddingError(
                f"embedding failed: {contract.ENCODER_MODEL} returned {embedding.shape} for "
                f"{len(texts)} texts",
                self.pb_utils.TritonError.INTERNAL,
            )
        return np.asarray(embedding, dtype=np.float32)

    def _infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]
    ) -> dict[str, np.ndarray]:
        pb_utils = self.pb_utils
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            # The GPU profile's encoder answers in GPU memory otherwise (as_numpy cannot read it).
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            error = response.error()
            code = error.code()
            unavailable = code == pb_utils.TritonError.UNAVAILABLE
            raise EmbeddingError(
                f"embedding failed in {model}: {error.message()}",
                pb_utils.TritonError.UNAVAILABLE if unavailable else pb_utils.TritonError.INTERNAL,
            )
        tensors = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise EmbeddingError(
                    f"embedding failed: {model} returned no {name!r}",
                    pb_utils.TritonError.INTERNAL,
                )
            tensors[name] = tensor.as_numpy()
        return tensors


@dataclass(frozen=True)
class _Write:
    products: list[Product] | None = None  # an upsert
    delete_ids: list[str] | None = None  # or a delete


def parse_products(raw: np.ndarray) -> list[Product]:
    """The `products` input: one JSON object per product, all valid, or RequestError."""
    records = []
    values = byte_strings(raw, contract.PRODUCTS, "products", contract.MAX_PRODUCTS_PER_WRITE)
    for position, data in enumerate(values):
        if len(data) > contract.MAX_PRODUCT_JSON_BYTES:
            raise RequestError(
                f"product {position} is {len(data)} bytes of JSON; the maximum is "
                f"{contract.MAX_PRODUCT_JSON_BYTES}"
            )
        try:
            records.append(json.loads(data.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise RequestError(f"product {position} is not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise RequestError(
                f"product {position} is not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        except RecursionError:
            raise RequestError(f"product {position}: JSON nested too deeply") from None
    try:
        products = parse_product_writes(records)
    except CatalogError as e:
        raise RequestError(str(e)) from None
    for position, product in enumerate(products):
        if not visible_text(product.title):
            raise RequestError(
                f"product {position} ({product.id!r}): 'title' has no visible characters"
            )
        try:  # the store keeps attributes as strict JSON
            json.dumps(product.attributes, allow_nan=False)
        except ValueError:
            raise RequestError(
                f"product {position} ({product.id!r}): attributes hold NaN or infinity, "
                "which JSON has no value for"
            ) from None
    return products


def parse_delete_ids(raw: np.ndarray) -> list[str]:
    """The `delete_ids` input: product ids, each once (repeats are fine), or RequestError."""
    ids = []
    values = byte_strings(raw, contract.DELETE_IDS, "ids", contract.MAX_PRODUCTS_PER_WRITE)
    for position, data in enumerate(values):
        if len(data) > contract.MAX_PRODUCT_ID_BYTES:
            raise RequestError(
                f"id {position} is {len(data)} bytes; the maximum is "
                f"{contract.MAX_PRODUCT_ID_BYTES}"
            )
        try:
            product_id = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"id {position} is not valid UTF-8 ({e.reason})") from None
        if not product_id.strip():
            raise RequestError(f"id {position} is empty")
        ids.append(product_id)
    return list(dict.fromkeys(ids))


class CatalogModel(StoreWriter):
    """Writes to the live catalog. Not a BatchedModel: a request is one transaction, so the
    requests of an `execute` are handled in turn, one response each, in order.

    `store` is a CatalogStore (one connection: this model is its only user), or None when the
    served catalog is a file (every write is then UNSUPPORTED); `embed` turns texts into
    embeddings (BlsEmbedder when served); `encoder_fingerprint` identifies the served encoder
    (embeddings of another encoder are never reused or mixed)."""

    what = "catalog write"

    def __init__(
        self,
        pb_utils,
        store,
        embed: Embedder,
        encoder_fingerprint: str,
        write_key: str | None = None,
    ) -> None:
        super().__init__(pb_utils, write_key)
        self.store = store
        self.embed = embed
        self.encoder_fingerprint = encoder_fingerprint

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> CatalogModel:
        from ecomsearch.live.location import STORE_URL_ENV, served_store_url
        from ecomsearch.store import open_store

        layout, _ = ModelRepositoryLayout.of_triton_model(args)
        fingerprint = file_sha256(layout.encoder_onnx)
        write_key = os.environ.get(WRITE_KEY_ENV) or None
        url = served_store_url(layout)
        if url is None:
            # Search still works; the catalog is the file the index was built from.
            pb_utils.Logger.log_warn(
                f"catalog: no store (the index in {layout.index_dir} was built from a file and "
                f"${STORE_URL_ENV} is not set): every write is refused"
            )
            return cls(pb_utils, None, BlsEmbedder(pb_utils), fingerprint, write_key).instrumented(
                args
            )
        store = open_store(url)
        pb_utils.Logger.log_info(
            f"catalog: store {store.url} at seq {store.head()}, served encoder "
            f"{fingerprint[:12]} (store's: {(store.encoder_fingerprint or 'none yet')[:12]})"
        )
        pb_utils.Logger.log_info(
            "catalog: writes need the write key" if write_key else "catalog: writes are open"
        )
        return cls(pb_utils, store, BlsEmbedder(pb_utils), fingerprint, write_key).instrumented(
            args
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        return [self._handle(request) for request in requests]

    def parse(self, request) -> _Write:
        products = input_array(self.pb_utils, request, contract.PRODUCTS)
        delete_ids = input_array(self.pb_utils, request, contract.DELETE_IDS)
        if (products is None) == (delete_ids is None):
            raise RequestError(
                f"send either {contract.PRODUCTS!r} (an upsert) or {contract.DELETE_IDS!r} "
                "(a delete), not both or neither"
            )
        if products is not None:
            return _Write(products=parse_products(products))
        return _Write(delete_ids=parse_delete_ids(delete_ids))

    def _handle(self, request):
        pb_utils = self.pb_utils
        if self.store is None:
            return self.error(
                "this server's catalog is a file, not a store: it takes no writes",
                pb_utils.TritonError.UNSUPPORTED,
            )
        if not self.authorised(request):
            return self.unauthorised()
        started = time.perf_counter()
        try:
            write = self.parse(request)
            if write.products is not None:
                result, embedded = self.upsert(write.products)
                what = f"upsert of {len(write.products)} products ({embedded} embedded)"
            else:
                result = self.delete(write.delete_ids)
                what = f"delete of {len(write.delete_ids)} ids"
            sequence_number = result.last_seq if result.last_seq is not None else self.store.head()
        except RequestError as e:
            return self.error(str(e), pb_utils.TritonError.INVALID_ARG)
        except EmbeddingError as e:
            self.logger.log_warn(f"catalog: nothing written: {e}")
            return self.error(f"nothing was written: {e}", e.code)
        except Exception as e:  # the store failed, or a bug: INTERNAL, logged in full
            return self.internal(e)
        milliseconds = (time.perf_counter() - started) * 1000
        self.logger.log_info(
            f"catalog: {what}: {result.changed} changed, seq {sequence_number}, "
            f"{milliseconds:.1f} ms"
        )
        return self.acknowledge(sequence_number, contract.CHANGED, result.changed)

    def upsert(self, products: Sequence[Product]) -> tuple[WriteResult, int]:
        """Writes `products` (validated) in one transaction; returns the result and how many
        were embedded. Nothing is written when embedding fails."""
        writes = [product_write(product) for product in products]
        texts = [product_text(write) for write in writes]
        stored_fingerprint = self.store.encoder_fingerprint
        if stored_fingerprint is not None and stored_fingerprint != self.encoder_fingerprint:
            # The store refuses to mix encoders; it is re-embedded when the encoder changes.
            raise EmbeddingError(
                f"the catalog store holds embeddings of encoder {stored_fingerprint[:12]} and "
                f"the served encoder is {self.encoder_fingerprint[:12]}; writes resume once "
                "the store is re-embedded with the served encoder",
                self.pb_utils.TritonError.UNAVAILABLE,
            )
        stored = self.store.get([write.id for write in writes], with_embeddings=True)
        rows: list[np.ndarray | None] = []
        for write, text in zip(writes, texts, strict=True):
            old = stored.get(write.id)
            same = old is not None and old.embedding is not None and product_text(old) == text
            rows.append(old.embedding if same else None)
        missing = [position for position, row in enumerate(rows) if row is None]
        if missing:
            embeddings = self.embed([texts[position] for position in missing])
            if embeddings.ndim != 2 or len(embeddings) != len(missing):
                raise RuntimeError(
                    f"the embedder returned {embeddings.shape} for {len(missing)} texts"
                )
            for position, embedding in zip(missing, embeddings, strict=True):
                rows[position] = embedding
        matrix = np.stack(rows).astype(np.float32, copy=False)
        return self.store.upsert(writes, matrix, self.encoder_fingerprint), len(missing)

    def delete(self, ids: Sequence[str]) -> WriteResult:
        return self.store.delete(ids)
