"""The `preprocess` model: query text (BYTES) to token ids for the encoder."""

from __future__ import annotations

from typing import Any

from ecomsearch import contract
from ecomsearch.paths import TOKENIZER_DIR, ModelRepositoryLayout
from ecomsearch.query import decode_queries, queries_array
from ecomsearch.serving.base import BatchedModel, Tensors, input_array
from ecomsearch.text import TextTokenizer, padded_length


class PreprocessModel(BatchedModel):
    def __init__(self, pb_utils, tokenizer: TextTokenizer) -> None:
        super().__init__(pb_utils)
        self.tokenizer = tokenizer

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], pb_utils) -> PreprocessModel:
        _, version_dir = ModelRepositoryLayout.of_triton_model(args)
        tokenizer = TextTokenizer(version_dir / TOKENIZER_DIR, max_length=contract.MAX_QUERY_TOKENS)
        pb_utils.Logger.log_info(
            f"preprocess: tokenizer {version_dir / TOKENIZER_DIR}, at most "
            f"{contract.MAX_QUERY_TOKENS} tokens and {contract.MAX_QUERY_BYTES} bytes a query"
        )
        return cls(pb_utils, tokenizer)

    def parse(self, request) -> Tensors:
        queries = decode_queries(input_array(self.pb_utils, request, contract.QUERY))
        return {contract.QUERY: queries_array(queries)}

    def run(self, inputs: Tensors) -> Tensors:
        # One tokenizer call for every query of every request (the fast tokenizer parallelises).
        input_ids, attention_mask = self.tokenizer(list(inputs[contract.QUERY]))
        return {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask}

    def finish(self, outputs: Tensors) -> Tensors:
        # Each request is padded to its own longest query (rounded up), not to the batch's:
        # requests of similar length then share a shape, which is what the encoder's dynamic
        # batcher needs to merge them.
        attention_mask = outputs[contract.ATTENTION_MASK]
        length = padded_length(int(attention_mask.sum(axis=1).max()), self.tokenizer.max_length)
        if length == attention_mask.shape[1]:
            return outputs
        return {name: value[:, :length] for name, value in outputs.items()}
