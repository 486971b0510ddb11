"""asyncio gRPC client: `search`, `recommend` and `similar`, and the `catalog` and `events`
writers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from ecomsearch import contract
from ecomsearch.client import protocol
from ecomsearch.client.errors import from_server_exception
from ecomsearch.client.protocol import EventsAck, Hit, ShopperEvent, WriteAck


class AsyncSearchClient(protocol.SearchClientBase):
    """The asyncio twin of SearchClient; use with `async with`."""

    def __init__(
        self,
        url: str = contract.DEFAULT_GRPC_URL,
        timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S,
        model_name: str = contract.SEARCH_MODEL,
        write_key: str | None = None,
    ) -> None:
        import tritonclient.grpc.aio as aioclient

        super().__init__(
            url, timeout_s, model_name, aioclient.InferenceServerClient(url=url), write_key
        )

    async def search(
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
        hits = await self.search_batch(
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
        )
        return hits[0]

    async def search_batch(
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
        """Sends the chunks of a long list concurrently; results keep the queries' order."""
        protocol.validate(queries, k)
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        results = await asyncio.gather(
            *(
                self._infer(
                    self.model_name,
                    protocol.build_inputs(
                        self._grpc, chunk, k, filters, user_id, explain, rerank_depth
                    ),
                    self._outputs,
                    self.timeout_s,
                )
                for chunk in protocol.chunks(queries)
            )
        )
        return [hits for result in results for hits in protocol.parse_hits(result)]

    async def recommend(
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
        """See SearchClient.recommend."""
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        inputs = protocol.build_recommend_inputs(
            self._grpc, user_id, k, recent_product_ids, filters
        )
        result = await self._infer(contract.RECOMMEND_MODEL, inputs, self._outputs, self.timeout_s)
        return protocol.parse_hits(result)[0]

    async def similar(
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
        """See SearchClient.similar."""
        filters = protocol.Filters(category, brand, min_price, max_price, in_stock)
        filters.validate()
        inputs = protocol.build_similar_inputs(self._grpc, product_id, k, filters)
        result = await self._infer(contract.SIMILAR_MODEL, inputs, self._outputs, self.timeout_s)
        return protocol.parse_hits(result)[0]

    async def record_events(
        self,
        events: Sequence[ShopperEvent | Mapping],
        timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S,
    ) -> EventsAck:
        """See SearchClient.record_events."""
        inputs = protocol.build_event_inputs(self._grpc, events)
        result = await self._infer(
            contract.EVENTS_MODEL,
            inputs,
            self._event_outputs,
            timeout_s,
            parameters=self._write_parameters,
        )
        return protocol.parse_events_ack(result)

    async def upsert_products(
        self, products: Sequence[Mapping], timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S
    ) -> WriteAck:
        """See SearchClient.upsert_products."""
        values = protocol.encode_products(products)
        inputs = protocol.build_write_inputs(self._grpc, contract.PRODUCTS, values)
        return await self._write(inputs, timeout_s)

    async def delete_products(
        self, ids: Sequence[str], timeout_s: float = protocol.DEFAULT_WRITE_TIMEOUT_S
    ) -> WriteAck:
        """See SearchClient.delete_products."""
        values = protocol.encode_ids(ids)
        inputs = protocol.build_write_inputs(self._grpc, contract.DELETE_IDS, values)
        return await self._write(inputs, timeout_s)

    async def _write(self, inputs: list, timeout_s: float) -> WriteAck:
        result = await self._infer(
            contract.CATALOG_MODEL,
            inputs,
            self._write_outputs,
            timeout_s,
            parameters=self._write_parameters,
        )
        return protocol.parse_ack(result)

    async def _infer(
        self,
        model_name: str,
        inputs: list,
        outputs: list | None,
        timeout_s: float,
        parameters: dict | None = None,
    ):
        try:
            return await self._client.infer(
                model_name,
                inputs,
                outputs=outputs,
                client_timeout=timeout_s,
                parameters=parameters,
            )
        except self._grpc.InferenceServerException as e:
            raise from_server_exception(e) from e

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
