"""Lexical matching: a tokenizer tuned for product text and BM25 indexes (bm25s) per field.

E-commerce queries are full of model numbers, sizes and units ("1tb nvme", "3/4 in. mdf",
"2x4") that embeddings blur; this keeps them as tokens, normalises common unit spellings and
plurals, and scores with BM25 over the title alone and over all text fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch.catalog import Product
from ecomsearch.spelling import SpellingCorrector, document_frequencies

# Numbers (with decimals or fractions: 2.5, 3/4) and runs of letters; "1tb" -> "1", "tb".
_TOKEN = re.compile(r"\d+(?:[./]\d+)*|[^\W\d_]+")
_UNITS = {
    "inch": "in", "inches": "in", "in": "in", '"': "in",
    "foot": "ft", "feet": "ft", "ft": "ft",
    "gallon": "gal", "gallons": "gal", "gal": "gal",
    "pound": "lb", "pounds": "lb", "lbs": "lb", "lb": "lb",
    "volt": "v", "volts": "v", "watt": "w", "watts": "w",
    "terabyte": "tb", "terabytes": "tb", "gigabyte": "gb", "gigabytes": "gb",
}  # fmt: skip
_STOPWORDS = frozenset(["a", "an", "and", "the", "for", "with", "of", "to", "on", "by", "or"])

FIELDS = ("title", "text")
# Beside each field's bm25s files: what bm25s does not save but scoring a new document with the
# same statistics needs (ecomsearch.live.catalog scores the live catalog's new products).
STATS_FILE = "stats.json"


def _normalise(token: str) -> str:
    if token in _UNITS:
        return _UNITS[token]
    if token[0].isdigit():
        return token
    # Light plural folding: "mowers" -> "mower", "batteries" -> "battery"; not "glass".
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def typed_tokens(text: str) -> list[str]:
    """Lower-cased word and number tokens as typed, stopwords dropped (tokenize's, before units
    and plurals are normalised)."""
    text = text.lower().replace('"', " in ")
    return [token for token in _TOKEN.findall(text) if token not in _STOPWORDS]


def tokenize(text: str) -> list[str]:
    """Lower-cased word and number tokens, units and plurals normalised, stopwords dropped."""
    return [_normalise(token) for token in typed_tokens(text)]


def is_number(token: str) -> bool:
    return token[0].isdigit()


def field_texts(product: Product) -> dict[str, str]:
    """What each BM25 field indexes: the title alone, and every text field together."""
    text = " ".join(
        p for p in (product.title, product.brand, product.category, product.description) if p
    )
    return {"title": product.title, "text": text}


@dataclass(frozen=True)
class QueryTerms:
    """A query's distinct tokens, and for each field their ids in that field's vocabulary."""

    tokens: tuple[str, ...]
    numbers: tuple[str, ...]
    ids: dict[str, list[int]]


class LexicalIndex:
    """One bm25s index per field, with row-aligned documents (row = FAISS row)."""

    def __init__(self, retrievers: dict, average_lengths: dict[str, float]) -> None:
        self.retrievers = retrievers
        self.average_lengths = average_lengths
        self.count = int(next(iter(retrievers.values())).scores["num_docs"])
        for retriever in retrievers.values():
            _sort_postings(retriever.scores)
        # Built once per index (0.6 s and 2.7 MB for the 17k words of 55k products), so no
        # request pays for it. The "text" field's vocabulary holds every word of every field.
        text = retrievers["text"]
        self.spelling = SpellingCorrector(
            document_frequencies(text.vocab_dict, text.scores["indptr"])
        )

    @classmethod
    def build(cls, products: Sequence[Product]) -> LexicalIndex:
        import bm25s

        retrievers, average_lengths = {}, {}
        texts = [field_texts(p) for p in products]
        for field in FIELDS:
            retriever = bm25s.BM25()
            tokens = [tokenize(t[field]) for t in texts]
            # create_empty_token keeps a document without tokens in its row.
            retriever.index(tokens, show_progress=False)
            retrievers[field] = retriever
            average_lengths[field] = sum(map(len, tokens)) / max(len(tokens), 1)
        return cls(retrievers, average_lengths)

    def save(self, directory: Path) -> None:
        for field, retriever in self.retrievers.items():
            retriever.save(str(directory / field), show_progress=False)
        stats = {"average_lengths": self.average_lengths}
        (directory / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")

    def parameters(self, field: str) -> tuple[float, float, float]:
        """(k1, b, average document length) of a field's BM25."""
        retriever = self.retrievers[field]
        # bm25s divides by the average length; a catalog of empty titles has none.
        return float(retriever.k1), float(retriever.b), max(self.average_lengths[field], 1e-9)

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        import bm25s

        retrievers = {
            field: bm25s.BM25.load(str(directory / field), show_progress=False, verbosity=0)
            for field in FIELDS
        }
        counts = {int(r.scores["num_docs"]) for r in retrievers.values()}
        if len(counts) != 1:
            raise ValueError(f"lexical fields disagree on the document count: {counts}")
        stats = json.loads((directory / STATS_FILE).read_text())
        average_lengths = {field: float(stats["average_lengths"][field]) for field in FIELDS}
        return cls(retrievers, average_lengths)

    def terms(self, query: str, known: Callable[[str], bool] | None = None) -> QueryTerms:
        """The query's distinct tokens after spelling correction (ecomsearch.spelling): a word
        no product uses is matched as the catalog's nearest word. `known` names further words
        to leave as typed (the live catalog's newer products)."""
        typed = typed_tokens(query)
        tokens = [_normalise(token) for token in typed]
        tokens = tuple(dict.fromkeys(self.spelling.correct(tokens, known, typed=typed)))
        ids = {
            field: [retriever.vocab_dict[t] for t in tokens if t in retriever.vocab_dict]
            for field, retriever in self.retrievers.items()
        }
        return QueryTerms(tokens, tuple(t for t in tokens if is_number(t)), ids)

    def scores(self, terms: QueryTerms, field: str) -> np.ndarray:
        """BM25 score of every document for the query's terms ([count] float32)."""
        ids = terms.ids[field]
        if not ids:
            return np.zeros(self.count, dtype=np.float32)
        return self.retrievers[field].get_scores_from_ids(ids).astype(np.float32, copy=False)

    def idf(self, field: str, tokens: Iterable[str]) -> np.ndarray:
        """BM25's inverse document frequency of each token in a field; a token no document
        has gets the rarest possible weight (it is informative, and nothing matches it)."""
        retriever = self.retrievers[field]
        indptr = retriever.scores["indptr"]
        frequencies = np.array(
            [
                indptr[term + 1] - indptr[term]
                if (term := retriever.vocab_dict.get(t)) is not None
                else 0
                for t in tokens
            ],
            dtype=np.float64,
        )
        return np.log1p((self.count - frequencies + 0.5) / (frequencies + 0.5))

    def contains(self, field: str, tokens: Iterable[str], rows: np.ndarray) -> np.ndarray:
        """[len(tokens), len(rows)] bool: whether each row's field has each token (postings)."""
        retriever = self.retrievers[field]
        matrix = retriever.scores
        tokens = list(tokens)
        present = np.zeros((len(tokens), len(rows)), dtype=bool)
        for position, token in enumerate(tokens):
            term = retriever.vocab_dict.get(token)
            if term is None:
                continue
            postings = matrix["indices"][matrix["indptr"][term] : matrix["indptr"][term + 1]]
            if len(postings):
                # Postings are sorted: a binary search per row, not a sort of both (np.isin).
                slots = np.minimum(np.searchsorted(postings, rows), len(postings) - 1)
                present[position] = postings[slots] == rows
        return present


def _sort_postings(matrix: dict) -> None:
    """Sorts each term's document ids (and their weights) in place if they are not already."""
    indices, indptr, data = matrix["indices"], matrix["indptr"], matrix["data"]
    ascending = np.diff(indices) > 0
    starts = indptr[1:-1]
    ascending[starts[(starts > 0) & (starts < len(indices))] - 1] = True  # a term may start lower
    if ascending.all():
        return
    for term in range(len(indptr) - 1):
        start, end = indptr[term], indptr[term + 1]
        order = np.argsort(indices[start:end], kind="stable")
        indices[start:end] = indices[start:end][order]
        data[start:end] = data[start:end][order]
