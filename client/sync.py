"""Blocking gRPC client: `search`, `recommend` and `similar`, and the `catalog` and `events`
writers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ecomsearch import contract
from ecomsearch.client import protocol
from ecomsearch.client.errors import ServiceUnavailableError, from_server_exception
from ecomsearch.client.protocol import EventsAck, Hit, ShopperEvent, WriteAck


class SearchClient(protocol.SearchClientBase):
    """Product search over gRPC; use as a context manager.

    >>> with SearchClient("localhost:8001") as client:
    ...     hits = client.search("wireless gaming mouse", k=5, max_price=50.0, in_stock=True)
    """

    def __init__(
        self,
        url: str = contract.DEFAULT_GRPC_URL,
        timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S,
        model_name: str = contract.SEARCH_MODEL,
        write_key: str | None = None,
    ) -> None:
        import tritonclient.grpc as grpcclient

        super().__init__(
            url, timeout_s, model_name, grpcclient.InferenceServerClient(url=url), write_key
        )

    def search(
        self,
        query: str,
        k: int = contract.DEFAULT_TOP_K,
        *,
        category: str | None = None,
        brand: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        in_stock: bool | None = None,
        user_id: str | None = None,
        explain: bool = False,
        rerank_depth: int | None = None,
    ) -> list[Hit]:
        """The top-k products for one query, best first, among those passing the filters;
        with `user_id`, personalised: raised by what that shopper bought; with `explain`, each
        hit carries its score's parts (`Hit.explanation`); with `rerank_depth`, the best that
        many candidates are rescored by the cross-encoder (0: never; None: the server's default,
        none as shipped)."""
        return self.search_batch(
            [query],
            k,
            category=category,
            brand=brand,
            min_price=min_price,
            max_price=max_price,
            in_stock=in_stock,
            user_id=user_id,
            explain=explain,
            rerank_depth=rerank_depth,
        )[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = contract.DEFAULT_TOP_K,
        *,
        category: str | None = None,
        brand: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        in_stock: bool | None = None,
        user_id: str | None = None,
        explain: bool = False,
        rerank_depth: int | None = None,
    ) -> list[list[Hit]]:
        """Top-k for many queries, the filters (and the shopper, for a personalised search)
        applying to each; sent in requests of at most MAX_QUERIES_PER_REQUEST."""
        protocol.validate(queries, k)
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        hits: list[list[Hit]] = []
        for chunk in protocol.chunks(queries):
            result = self._infer(
                self.model_name,
                protocol.build_inputs(
                    self._grpc, chunk, k, filters, user_id, explain, rerank_depth
                ),
                self._outputs,
                self.timeout_s,
            )
            hits.extend(protocol.parse_hits(result))
        return hits

    def recommend(
        self,
        user_id: str,
        k: int = contract.DEFAULT_TOP_K,
        *,
        recent_product_ids: Sequence[str] = (),
        category: str | None = None,
        brand: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        in_stock: bool | None = None,
    ) -> list[Hit]:
        """The top-k products for a shopper, best first, among those passing the filters.
        `recent_product_ids`: what the shopper looked at that the event log does not hold yet.
        An unknown (or empty) user id gets the popular products."""
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        inputs = protocol.build_recommend_inputs(
            self._grpc, user_id, k, recent_product_ids, filters
        )
        result = self._infer(contract.RECOMMEND_MODEL, inputs, self._outputs, self.timeout_s)
        return protocol.parse_hits(result)[0]

    def similar(
        self,
        product_id: str,
        k: int = contract.DEFAULT_TOP_K,
        *,
        category: str | None = None,
        brand: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        in_stock: bool | None = None,
    ) -> list[Hit]:
        """Products bought with `product_id` or like it, best first (BadRequestError if the
        catalog has no such product)."""
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        inputs = protocol.build_similar_inputs(self._grpc, product_id, k, filters)
        result = self._infer(contract.SIMILAR_MODEL, inputs, self._outputs, self.timeout_s)
        return protocol.parse_hits(result)[0]

    def record_events(
        self,
        events: Sequence[ShopperEvent | Mapping],
        timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S,
    ) -> EventsAck:
        """Records up to MAX_EVENTS_PER_WRITE events in one transaction: all or none (an
        error, e.g. for a product the catalog does not have). The ack comes after the commit;
        from then on the events shape every recommendation."""
        inputs = protocol.build_event_inputs(self._grpc, events)
        result = self._infer(
            contract.EVENTS_MODEL,
            inputs,
            self._event_outputs,
            timeout_s,
            parameters=self._write_parameters,
        )
        return protocol.parse_events_ack(result)

    def upsert_products(
        self, products: Sequence[Mapping], timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S
    ) -> WriteAck:
        """Inserts or replaces up to MAX_PRODUCTS_PER_WRITE products (JSON objects with at
        least `id` and `title`) in one transaction: all are written, or none (an error). The
        ack comes after the commit. A write that timed out may still have been committed;
        sending it again is safe."""
        values = protocol.encode_products(products)
        inputs = protocol.build_write_inputs(self._grpc, contract.PRODUCTS, values)
        return self._write(inputs, timeout_s)

    def delete_products(
        self, ids: Sequence[str], timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S
    ) -> WriteAck:
        """Deletes up to MAX_PRODUCTS_PER_WRITE products in one transaction; unknown ids are
        skipped (they do not count as changed)."""
        values = protocol.encode_ids(ids)
        inputs = protocol.build_write_inputs(self._grpc, contract.DELETE_IDS, values)
        return self._write(inputs, timeout_s)

    def _write(self, inputs: list, timeout_s: float) -> WriteAck:
        result = self._infer(
            contract.CATALOG_MODEL,
            inputs,
            self._write_outputs,
            timeout_s,
            parameters=self._write_parameters,
        )
        return protocol.parse_ack(result)

    def _infer(
        self,
        model_name: str,
        inputs: list,
        outputs: list | None,
        timeout_s: float,
        parameters: dict | None = None,
    ):
        try:
            return self._client.infer(
                model_name,
                inputs,
                outputs=outputs,
                client_timeout=timeout_s,
                parameters=parameters,
            )
        except self._grpc.InferenceServerException as e:
            raise from_server_exception(e) from e

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServiceUnavailableError(f"{self.url}: model {self.model_name!r} not ready")

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s))
        except self._grpc.InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
