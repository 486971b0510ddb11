"""Blocking gRPC client for the `search` ensemble."""

from __future__ import annotations

from collections.abc import Sequence

from ecomsearch import contract
from ecomsearch.client import protocol
from ecomsearch.client.errors import ServiceUnavailableError, from_server_exception
from ecomsearch.client.protocol import Hit


class SearchClient(protocol.SearchClientBase):
    """Product search over gRPC; use as a context manager.

    >>> with SearchClient("localhost:8001") as client:
    ...     hits = client.search("wireless gaming mouse", k=5)
    """

    def __init__(
        self,
        url: str = contract.DEFAULT_GRPC_URL,
        timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S,
        model_name: str = contract.SEARCH_MODEL,
    ) -> None:
        import tritonclient.grpc as grpcclient

        super().__init__(url, timeout_s, model_name, grpcclient.InferenceServerClient(url=url))

    def search(self, query: str, k: int = contract.DEFAULT_TOP_K) -> list[Hit]:
        """The top-k products for one query, best first."""
        return self.search_batch([query], k)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = contract.DEFAULT_TOP_K
    ) -> list[list[Hit]]:
        """Top-k for many queries; sent in requests of at most MAX_QUERIES_PER_REQUEST."""
        protocol.validate(queries, k)
        hits: list[list[Hit]] = []
        for chunk in protocol.chunks(queries):
            try:
                result = self._client.infer(
                    self.model_name,
                    protocol.build_inputs(self._grpc, chunk, k),
                    outputs=self._outputs,
                    client_timeout=self.timeout_s,
                )
            except self._grpc.InferenceServerException as e:
                raise from_server_exception(e) from e
            hits.extend(protocol.parse_hits(result))
        return hits

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
