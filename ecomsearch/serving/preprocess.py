"""The `preprocess` model: query text (BYTES) to token ids for the encoder."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.serving.base import (
    BatchedModel,
    RequestError,
    input_array,
    int_parameter,
    model_config,
    parameter,
)
from ecomsearch.text import TextTokenizer


def decode_queries(raw: np.ndarray | None, max_query_bytes: int) -> list[str]:
    """Validates a [batch, 1] BYTES tensor of queries; raises RequestError naming the bad row."""
    if raw is None:
        raise RequestError(f"input {contract.QUERY!r} is required")
    if raw.ndim != 2 or raw.shape[1] != 1 or raw.shape[0] == 0:
        raise RequestError(f"input {contract.QUERY!r} must have shape [batch, 1], got {raw.shape}")
    queries = []
    for row, value in enumerate(raw[:, 0]):
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if len(data) > max_query_bytes:
            raise RequestError(
                f"query {row} is {len(data)} bytes; the maximum is {max_query_bytes}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"query {row} is not valid UTF-8 ({e.reason})") from None
        text = " ".join(text.split())
        if not text:
            raise RequestError(f"query {row} is empty or only whitespace")
        queries.append(text)
    return queries


class PreprocessModel(BatchedModel[list[str]]):
    def __init__(self, pb_utils, tokenizer: TextTokenizer, max_query_bytes: int) -> None:
        super().__init__(pb_utils)
        self.tokenizer = tokenizer
        self.max_query_bytes = max_query_bytes

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> PreprocessModel:
        config = model_config(args)
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        tokenizer_dir = version_dir / parameter(config, "tokenizer_dir", "tokenizer")
        max_tokens = int_parameter(config, "max_query_tokens", contract.MAX_QUERY_TOKENS, 2)
        max_bytes = int_parameter(config, "max_query_bytes", contract.MAX_QUERY_BYTES, 1)
        tokenizer = TextTokenizer(tokenizer_dir, max_length=max_tokens)
        pb_utils.Logger.log_info(
            f"preprocess: tokenizer {tokenizer_dir}, max {max_tokens} tokens, {max_bytes} bytes"
        )
        return cls(pb_utils, tokenizer, max_bytes)

    def parse(self, request) -> list[str]:
        return decode_queries(
            input_array(self.pb_utils, request, contract.QUERY), self.max_query_bytes
        )

    def run(self, parsed: list[list[str]]) -> list[dict[str, np.ndarray]]:
        # One tokenizer call for every query of every request (the fast tokenizer parallelises).
        all_ids = self.tokenizer.token_ids([q for queries in parsed for q in queries])
        counts = [len(queries) for queries in parsed]
        offsets = np.cumsum([0, *counts])
        outputs = []
        for start, end in itertools.pairwise(offsets):
            # Padded per request: requests of similar length then share a shape, which is what
            # the encoder's dynamic batcher needs to merge them.
            input_ids, attention_mask = self.tokenizer.pad(all_ids[start:end])
            outputs.append({contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask})
        return outputs
