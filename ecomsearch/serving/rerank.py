"""How `select` asks the `cross_encoder` model for its verdict on (query, title) pairs: tokenized
here with the served tokenizer, scored by a BLS call in chunks the model's batch accepts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ecomsearch import contract
from ecomsearch.text import PairTokenizer

# The cross_encoder config's max_batch_size (tests/unit/test_model_configs.py checks they agree).
CROSS_ENCODER_MAX_PAIRS = 256


class RerankUnavailableError(RuntimeError):
    """The cross-encoder did not answer: the search is served without the rerank."""


def pair_logits(
    tokenizer: PairTokenizer,
    infer: Callable[[dict[str, np.ndarray]], np.ndarray],
    queries: Sequence[str],
    titles: Sequence[str],
    max_pairs: int = CROSS_ENCODER_MAX_PAIRS,
) -> np.ndarray:
    """The cross-encoder's logit of each (query, title) pair, float32 [pairs]: tokenized and
    `infer`red (the cross_encoder graph's inputs -> its logits [n]) in chunks of max_pairs.
    Served by a BLS call here, by ONNX Runtime when the teacher labels training data."""
    logits = np.empty(len(queries), dtype=np.float32)
    names = (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.TOKEN_TYPE_IDS)
    for start in range(0, len(queries), max_pairs):
        end = start + max_pairs
        arrays = tokenizer(queries[start:end], titles[start:end])
        logits[start:end] = infer(dict(zip(names, arrays, strict=True)))
    return logits


class CrossEncoderScorer:
    """(queries, titles) -> one relevance logit per pair, from the served cross_encoder."""

    def __init__(self, pb_utils, tokenizer_dir) -> None:
        self.pb_utils = pb_utils
        self.tokenizer = PairTokenizer(tokenizer_dir, contract.CROSS_ENCODER_MAX_TOKENS)

    def __call__(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        return pair_logits(self.tokenizer, self._infer, queries, titles)

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
