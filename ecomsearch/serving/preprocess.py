"""The `preprocess` model: query text (BYTES) to token ids for the encoder.

Queries are cut at MAX_QUERY_TOKENS. The catalog writer sends product text through the same
model with the optional `max_tokens` (PRODUCT_MAX_TOKENS), so products are embedded on the
served encoder with the tokenizer that index building uses.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.paths import TOKENIZER_DIR, ModelRepositoryLayout
from ecomsearch.query import decode_queries, queries_array
from ecomsearch.serving.base import BatchedModel, RequestError, Tensors, input_array
from ecomsearch.text import TextTokenizer, pad_token_ids, padded_length

# The fewest tokens a sequence can have: the tokenizer's start and end tokens.
MIN_TOKENS = 2


def parse_max_tokens(raw: np.ndarray | None, batch: int) -> int:
    """The request's token limit: absent means MAX_QUERY_TOKENS; one value for every query."""
    if raw is None:
        return contract.MAX_QUERY_TOKENS
    if raw.shape != (batch, 1):
        raise RequestError(
            f"input {contract.MAX_TOKENS!r} must have shape [{batch}, 1], got {raw.shape}"
        )
    values = np.unique(raw)
    if len(values) != 1:
        raise RequestError(f"{contract.MAX_TOKENS!r} must be the same for every query of a request")
    max_tokens = int(values[0])
    if not MIN_TOKENS <= max_tokens <= contract.PRODUCT_MAX_TOKENS:
        raise RequestError(
            f"{contract.MAX_TOKENS!r} must be between {MIN_TOKENS} and "
            f"{contract.PRODUCT_MAX_TOKENS}, got {max_tokens}"
        )
    return max_tokens


class PreprocessModel(BatchedModel):
    def __init__(self, pb_utils, tokenizers: Sequence[TextTokenizer]) -> None:
        """`tokenizers`: the same tokenizer truncating at different lengths; the longest sets
        the largest `max_tokens` served (the contract's two limits are both expected)."""
        super().__init__(pb_utils)
        self.tokenizers = sorted(tokenizers, key=lambda tokenizer: tokenizer.max_length)
        if not self.tokenizers:
            raise ValueError("PreprocessModel needs at least one tokenizer")

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> PreprocessModel:
        _, version_dir = ModelRepositoryLayout.of_triton_model(args)
        # One per limit the service uses, so both truncate exactly as index building does.
        tokenizers = [
            TextTokenizer(version_dir / TOKENIZER_DIR, max_length=length)
            for length in (contract.MAX_QUERY_TOKENS, contract.PRODUCT_MAX_TOKENS)
        ]
        pb_utils.Logger.log_info(
            f"preprocess: tokenizer {version_dir / TOKENIZER_DIR}, at most "
            f"{contract.MAX_QUERY_TOKENS} tokens (product text: {contract.MAX_TOKENS!r} up to "
            f"{contract.PRODUCT_MAX_TOKENS}) and {contract.MAX_QUERY_BYTES} bytes a query"
        )
        return cls(pb_utils, tokenizers).instrumented(args)

    def parse(self, request) -> Tensors:
        queries = decode_queries(input_array(self.pb_utils, request, contract.QUERY))
        max_tokens = parse_max_tokens(
            input_array(self.pb_utils, request, contract.MAX_TOKENS), len(queries)
        )
        return {
            contract.QUERY: queries_array(queries),
            contract.MAX_TOKENS: np.full(len(queries), max_tokens, dtype=np.int32),
        }

    def group_key(self, inputs: Tensors) -> Hashable:
        # Requests with different limits run apart: one tokenizer call truncates at one length.
        return super().group_key(inputs), int(inputs[contract.MAX_TOKENS][0])

    def run(self, inputs: Tensors) -> Tensors:
        max_tokens = int(inputs[contract.MAX_TOKENS][0])
        # The shortest tokenizer that keeps max_tokens: exact for the contract's limits.
        tokenizer = next(
            (t for t in self.tokenizers if t.max_length >= max_tokens), self.tokenizers[-1]
        )
        # One tokenizer call for every query of every request (the fast tokenizer parallelises).
        token_ids = tokenizer.token_ids(list(inputs[contract.QUERY]))
        if max_tokens < tokenizer.max_length:
            # Any other limit: the first tokens and the end-of-sequence token, as truncation does.
            token_ids = [
                ids if len(ids) <= max_tokens else [*ids[: max_tokens - 1], ids[-1]]
                for ids in token_ids
            ]
        input_ids, attention_mask = pad_token_ids(token_ids, tokenizer.pad_id, max_tokens)
        return {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask}

    def finish(self, outputs: Tensors) -> Tensors:
        # Each request is padded to its own longest query (rounded up), not to the batch's:
        # requests of similar length then share a shape, which is what the encoder's dynamic
        # batcher needs to merge them. (The batch's width is at most the requests' max_tokens.)
        attention_mask = outputs[contract.ATTENTION_MASK]
        length = padded_length(int(attention_mask.sum(axis=1).max()), attention_mask.shape[1])
        if length == attention_mask.shape[1]:
            return outputs
        return {name: value[:, :length] for name, value in outputs.items()}
