"""The exported ONNX query/product encoder run in-process (index building, benchmarks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.fingerprint import file_sha256
from ecomsearch.text import TextTokenizer

log = logging.getLogger(__name__)


class OnnxEncoder:
    """Tokenizer plus ONNX Runtime session over the tokenizer-free encoder graph."""

    def __init__(
        self,
        onnx_path: Path | str,
        tokenizer_dir: Path | str,
        max_length: int,
        intra_op_threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        """`providers`: ONNX Runtime's execution providers in order of preference."""
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(
                f"encoder {self.onnx_path} not found; run `ecomsearch export-encoder`"
            )
        self.tokenizer = TextTokenizer(tokenizer_dir, max_length=max_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(
            str(self.onnx_path), options, providers=list(providers)
        )
        (output,) = self._session.get_outputs()
        self.dimension = int(output.shape[1])
        self.fingerprint = file_sha256(self.onnx_path)

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (embedding,) = self._session.run(
            [contract.EMBEDDING],
            {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask},
        )
        return embedding

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embeds texts in length-sorted batches (little padding), returned in input order."""
        token_ids = self.tokenizer.token_ids(texts)
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        embeddings = np.empty((len(texts), self.dimension), dtype=np.float32)
        batches = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="embedding", unit="batch")
        for start in batches:
            rows = order[start : start + batch_size]
            input_ids, attention_mask = self.tokenizer.pad([token_ids[i] for i in rows])
            embeddings[rows] = self.encode_ids(input_ids, attention_mask)
        return embeddings


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of `a` with the same row of `b` ([n, d] each -> [n]). A pair with
    a zero row (an all-padding input embeds to zero) scores 1 when the rows are equal, else 0."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    equal = np.all(a == b, axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), equal.astype(dots.dtype))
