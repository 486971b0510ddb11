"""How `select` asks the `cross_encoder` model for its verdict on (query, title) pairs: tokenized
here with the served tokenizer, scored by a BLS call in chunks the model's batch accepts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ecomsearch import contract
from ecomsearch.text import PairTokenizer
from ecomsearch.tuning.cross_encoder import PAIR_MAX_TOKENS

# The cross_encoder config's max_batch_size (tests/unit/test_model_configs.py checks they agree).
CROSS_ENCODER_MAX_PAIRS = 256


class RerankUnavailableError(RuntimeError):
    """The cross-encoder did not answer: the search is served without the rerank."""


class CrossEncoderScorer:
    """(queries, titles) -> one relevance logit per pair, from the served cross_encoder."""

    def __init__(self, pb_utils, tokenizer_dir, max_pairs: int = CROSS_ENCODER_MAX_PAIRS):
        self.pb_utils = pb_utils
        self.tokenizer = PairTokenizer(tokenizer_dir, PAIR_MAX_TOKENS)
        self.max_pairs = max_pairs

    def __call__(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        logits = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), self.max_pairs):
            end = start + self.max_pairs
            input_ids, attention_mask, token_type_ids = self.tokenizer(
                queries[start:end], titles[start:end]
            )
            logits[start:end] = self._infer(
                {
                    contract.INPUT_IDS: input_ids,
                    contract.ATTENTION_MASK: attention_mask,
                    contract.TOKEN_TYPE_IDS: token_type_ids,
                }
            )
        return logits

    def _infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        pb_utils = self.pb_utils
        request = pb_utils.InferenceRequest(
            model_name=contract.CROSS_ENCODER_MODEL,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=[contract.RELEVANCE_LOGITS],
            # On a GPU the answer would stay in device memory, which as_numpy cannot read.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise RerankUnavailableError(
                f"{contract.CROSS_ENCODER_MODEL} failed: {response.error().message()}"
            )
        tensor = pb_utils.get_output_tensor_by_name(response, contract.RELEVANCE_LOGITS)
        pairs = len(inputs[contract.INPUT_IDS])
        logits = None if tensor is None else tensor.as_numpy().reshape(-1)
        if logits is None or len(logits) != pairs:
            raise RerankUnavailableError(
                f"{contract.CROSS_ENCODER_MODEL} answered {None if logits is None else len(logits)}"
                f" logits for {pairs} pairs"
            )
        return logits.astype(np.float32, copy=False)
