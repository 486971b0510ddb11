"""Tokenization shared by the preprocess model, index building and benchmarks.

The encoder graph is tokenizer-free (token ids in), so the same tokenizer settings must be used
wherever text becomes ids: this module is that one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Padded lengths are rounded up to a multiple of this, so requests of similar length share a
# shape and the encoder's dynamic batcher (which only batches equal shapes) can merge them.
SEQUENCE_LENGTH_MULTIPLE = 8

TOKENIZER_FILE = "tokenizer.json"


def _truncating_tokenizer(tokenizer_dir: Path | str, max_length: int, shortest: int):
    """The fast tokenizer of tokenizer_dir, truncating to max_length (the longer side of a
    pair first) and not padding, and its [PAD] id."""
    from tokenizers import Tokenizer  # imported here: the thin client never needs it

    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; run `ecomsearch export-encoder`")
    if max_length < shortest:
        raise ValueError(f"max_length must be at least {shortest}, got {max_length}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    pad_id = tokenizer.token_to_id("[PAD]")
    return tokenizer, 0 if pad_id is None else pad_id


class TextTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) that truncates and pads to numpy batches."""

    def __init__(self, tokenizer_dir: Path | str, max_length: int) -> None:
        self._tokenizer, self.pad_id = _truncating_tokenizer(tokenizer_dir, max_length, 2)
        self.max_length = max_length

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length, special tokens included."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def pad(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pads to the longest row rounded up to SEQUENCE_LENGTH_MULTIPLE (capped at max_length).

        Returns int64 `input_ids` and `attention_mask` of shape [rows, sequence].
        """
        return pad_token_ids(token_ids, self.pad_id, self.max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.token_ids(texts))


def padded_length(longest: int, max_length: int) -> int:
    rounded = -(-longest // SEQUENCE_LENGTH_MULTIPLE) * SEQUENCE_LENGTH_MULTIPLE
    return max(1, min(rounded, max_length))


def pad_token_ids(
    token_ids: Sequence[Sequence[int]], pad_id: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    longest = max((len(ids) for ids in token_ids), default=1)
    length = padded_length(longest, max_length)
    input_ids = np.full((len(token_ids), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), length), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


class PairTokenizer:
    """Query and product text as one BERT pair ([CLS] query [SEP] product [SEP]) for the
    cross-encoder: the longer side is truncated first (the product, but for an absurd query), and
    token_type_ids tell them apart."""

    def __init__(self, tokenizer_dir: Path | str, max_length: int) -> None:
        # [CLS] q [SEP] t [SEP]: five tokens keep one token of each side.
        self._tokenizer, self.pad_id = _truncating_tokenizer(tokenizer_dir, max_length, 5)
        self.max_length = max_length

    def __call__(
        self, queries: Sequence[str], texts: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 `input_ids`, `attention_mask` and `token_type_ids`, [pairs, sequence]."""
        if len(queries) != len(texts):
            raise ValueError(f"{len(queries)} queries for {len(texts)} texts")
        encodings = self._tokenizer.encode_batch(list(zip(queries, texts, strict=True)))
        input_ids, attention_mask = pad_token_ids(
            [e.ids for e in encodings], self.pad_id, self.max_length
        )
        token_type_ids = np.zeros_like(input_ids)
        for row, encoding in enumerate(encodings):
            token_type_ids[row, : len(encoding.type_ids)] = encoding.type_ids
        return input_ids, attention_mask, token_type_ids
