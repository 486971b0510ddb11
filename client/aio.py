"""asyncio gRPC client for the `search` ensemble."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ecomsearch import contract
from ecomsearch.client import protocol
from ecomsearch.client.errors import from_server_exception
from ecomsearch.client.protocol import Hit


class AsyncSearchClient(protocol.SearchClientBase):
    """The asyncio twin of SearchClient; use with `async with`."""

    def __init__(
        self,
        url: str = contract.DEFAULT_GRPC_URL,
        timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S,
        model_name: str = contract.SEARCH_MODEL,
    ) -> None:
        import tritonclient.grpc.aio as aioclient

        super().__init__(url, timeout_s, model_name, aioclient.InferenceServerClient(url=url))

    async def search(self, query: str, k: int = contract.DEFAULT_TOP_K) -> list[Hit]:
        return (await self.search_batch([query], k))[0]

    async def search_batch(
        self, queries: Sequence[str], k: int = contract.DEFAULT_TOP_K
    ) -> list[list[Hit]]:
        """Sends the chunks of a long list concurrently; results keep the queries' order."""
        protocol.validate(queries, k)
        results = await asyncio.gather(
            *(self._infer(chunk, k) for chunk in protocol.chunks(queries))
        )
        return [hits for chunk_hits in results for hits in chunk_hits]

    async def _infer(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        try:
            result = await self._client.infer(
                self.model_name,
                protocol.build_inputs(self._grpc, queries, k),
                outputs=self._outputs,
                client_timeout=self.timeout_s,
            )
        except self._grpc.InferenceServerException as e:
            raise from_server_exception(e) from e
        return protocol.parse_hits(result)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
