"""The catalog one `retrieve` instance serves: a built base index plus the changes made since.

The base (FAISS vectors, BM25 fields, filter columns) is what `build-index` or the last
compaction wrote at change sequence number S. Every change after S, read from the store's log,
is applied here:

- a new or changed product is appended to the *delta*: its vector to a small matrix searched
  exactly, its text to small BM25 postings scored with the base's statistics, its attributes to
  the filter columns;
- the row that held the product before (in the base or earlier in the delta) is masked dead.

Rows are numbered base first (0..N-1), then delta rows in the order they were appended. Rows
never leave this process: what goes downstream is each row's *key*, the product's stable number
in the store (ecomsearch.store), which every instance and `select` resolve the same way. A
static index (built without a store) uses its row numbers as keys.

Not thread-safe: one thread applies changes while none searches (the `retrieve` model holds a
lock around both, see ecomsearch.live.follower).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ecomsearch.catalog import Product, split_category
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import FIELDS, LexicalIndex, QueryTerms, field_texts, tokenize
from ecomsearch.live.filters import NO_FILTER, FilterColumns, SearchFilter
from ecomsearch.store.base import catalog_product

# An approximate (HNSW) base searched under a filter that passes at most this many rows is
# searched exactly over those rows instead: a graph walk restricted to a small subset visits
# mostly rejected nodes and can come back short.
EXACT_SUBSET_MAX_ROWS = 4096
# A flat base on the CPU is scanned through a float16 copy of its vectors (FAISS's scalar
# quantizer: half the bytes to stream, 2.4x faster at 16k products here), for this many
# candidates beyond k, which are then rescored exactly in float32 and cut to k. float16 moves
# an inner product of unit vectors by about 1e-3, far less than the scores a margin of k/4
# candidates spans, so the k returned are the exact search's k, with its scores.
SCAN_MARGIN_FRACTION = 0.25


def flat_vectors(faiss_index: Any) -> np.ndarray:
    """The index's vectors as a [ntotal, d] float32 array: a view of a flat index's (or an
    HNSW index's flat storage) memory when possible, else a copy."""
    import faiss

    flat = faiss_index
    if isinstance(flat, faiss.IndexHNSW):
        flat = faiss.downcast_index(flat.storage)
    n, d = int(faiss_index.ntotal), int(faiss_index.d)
    if isinstance(flat, faiss.IndexFlat) and n:
        return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    return faiss_index.reconstruct_n(0, n) if n else np.zeros((0, d), np.float32)


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best (score, row) pairs of [n, m] arrays (rows -1 are padding), best
    first, ties by lower row; padded with (-inf, -1) when fewer than k are real."""
    n = len(scores)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    out_rows = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        real = rows[i] >= 0
        s, r = scores[i][real], rows[i][real]
        if len(s) > k:
            keep = np.argpartition(-s, k - 1)[:k]
            kth = s[keep].min()
            # Every pair tied with the k-th best competes for the last places, by row.
            candidates = np.flatnonzero(s >= kth)
            s, r = s[candidates], r[candidates]
        order = np.lexsort((r, -s))[:k]
        out_scores[i, : len(order)] = s[order]
        out_rows[i, : len(order)] = r[order]
    return out_scores, out_rows


class DeltaLexical:
    """BM25 over the delta's products, scored with the base's statistics (document count,
    document frequencies, average length, k1 and b) so delta and base scores compare; the
    statistics catch up with the delta at the next compaction."""

    def __init__(self, base: LexicalIndex) -> None:
        self.base = base
        self._postings: dict[str, dict[str, list[int]]] = {field: {} for field in FIELDS}
        self._counts: dict[str, list[Counter]] = {field: [] for field in FIELDS}
        self._lengths: dict[str, list[int]] = {field: [] for field in FIELDS}
        # Each row's BM25 length normalisation, k1 * (1 - b + b * length / average length):
        # fixed once the row is appended, so computed then, not for every query.
        self._norms: dict[str, np.ndarray] = {field: np.zeros(0) for field in FIELDS}

    @property
    def count(self) -> int:
        return len(self._lengths[FIELDS[0]])

    def append(self, products: Iterable[Product]) -> None:
        for product in products:
            texts = field_texts(product)
            for field in FIELDS:
                tokens = tokenize(texts[field])
                counts = Counter(tokens)
                row = len(self._counts[field])
                self._counts[field].append(counts)
                self._lengths[field].append(len(tokens))
                postings = self._postings[field]
                for token in counts:
                    postings.setdefault(token, []).append(row)
        for field in FIELDS:
            k1, b, average_length = self.base.parameters(field)
            lengths = np.asarray(self._lengths[field][len(self._norms[field]) :], np.float64)
            fresh = k1 * ((1 - b) + b * lengths / average_length)
            self._norms[field] = np.concatenate([self._norms[field], fresh])

    def scores(self, terms: QueryTerms, field: str) -> np.ndarray:
        """BM25 (bm25s's Lucene variant) of every delta row for the query ([count] float32)."""
        scores = np.zeros(self.count, dtype=np.float64)
        if not self.count or not terms.tokens:
            return scores.astype(np.float32)
        norm = self._norms[field]
        idf = self.base.idf(field, terms.tokens)
        counts = self._counts[field]
        for token, weight in zip(terms.tokens, idf, strict=True):
            rows = self._postings[field].get(token)
            if rows:
                rows_array = np.asarray(rows)
                tf = np.array([counts[row][token] for row in rows], dtype=np.float64)
                scores[rows_array] += weight * tf / (norm[rows_array] + tf)
        return scores.astype(np.float32)

    def knows(self, word: str) -> bool:
        """Whether any delta row's text has `word` (all fields are in "text")."""
        return word in self._postings["text"]

    def contains(self, field: str, tokens: Sequence[str], rows: np.ndarray) -> np.ndarray:
        counts = self._counts[field]
        return np.array(
            [[token in counts[row] for row in rows] for token in tokens], dtype=bool
        ).reshape(len(tokens), len(rows))


class LiveLexical:
    """The lexical side of a LiveCatalog, with LexicalIndex's interface over all its rows."""

    def __init__(self, base: LexicalIndex, delta: DeltaLexical) -> None:
        self.base = base
        self.delta = delta

    @property
    def count(self) -> int:
        return self.base.count + self.delta.count

    def terms(self, query: str) -> QueryTerms:
        # A word only newer products use is known: it must match them, not be corrected away.
        return self.base.terms(query, known=self.delta.knows)

    def scores(self, terms: QueryTerms, field: str) -> np.ndarray:
        base = self.base.scores(terms, field)
        if not self.delta.count:
            return base
        return np.concatenate([base, self.delta.scores(terms, field)])

    def idf(self, field: str, tokens: Iterable[str]) -> np.ndarray:
        return self.base.idf(field, tokens)

    def contains(self, field: str, tokens: Iterable[str], rows: np.ndarray) -> np.ndarray:
        tokens = list(tokens)
        n = self.base.count
        in_base = rows < n
        if in_base.all():
            return self.base.contains(field, tokens, rows)
        present = np.zeros((len(tokens), len(rows)), dtype=bool)
        present[:, in_base] = self.base.contains(field, tokens, rows[in_base])
        present[:, ~in_base] = self.delta.contains(field, tokens, rows[~in_base] - n)
        return present


class LiveCatalog:
    """A base index and the changes applied since; see the module docstring."""

    def __init__(self, base: CatalogIndex, lexical: LexicalIndex) -> None:
        if lexical.count != base.count:
            raise ValueError(
                f"lexical index has {lexical.count} documents, the vector index {base.count}"
            )
        self.base = base
        self.base_count = base.count
        self.dimension = base.manifest.dimension
        self.base_vectors = flat_vectors(base.faiss_index)
        self._scan = half_precision_scan(base.faiss_index, self.base_vectors)
        self.applied_seq = base.manifest.catalog_seq or 0
        self.version_dir = base.index_dir
        self._keys = np.empty(self.base_count + 256, dtype=np.int64)
        self._keys[: self.base_count] = base.keys
        self._alive = np.ones(self.base_count + 256, dtype=bool)
        self._row_of_key: dict[int, int] = {key: row for row, key in enumerate(base.keys.tolist())}
        # Live products' ids -> keys: how requests that name products (`similar`, events'
        # recent products) find them.
        self._key_of_id: dict[str, int] = {
            product_id.decode("utf-8"): key
            for product_id, key in zip(base.ids.tolist(), base.keys.tolist(), strict=True)
        }
        self._delta_vectors = np.empty((256, self.dimension), dtype=np.float32)
        self.delta_rows = 0  # appended since the base, superseded ones included
        self._delta_ids: list[bytes] = []
        self.lexical = LiveLexical(lexical, DeltaLexical(lexical))
        self.columns = FilterColumns(self.base_count + 256)
        records = base.metadata
        self.columns.append(
            [r.get("brand", "") for r in records],
            [split_category(r.get("category", "")) for r in records],
            [r.get("price") for r in records],
            [r.get("in_stock", True) for r in records],
        )
        self._all_alive = True

    @classmethod
    def load(cls, base: CatalogIndex) -> LiveCatalog:
        return cls(base, base.load_lexical())

    @property
    def count(self) -> int:
        """Rows, base and delta, dead ones included."""
        return self.base_count + self.delta_rows

    @property
    def live_count(self) -> int:
        return len(self._row_of_key)

    @property
    def alive(self) -> np.ndarray:
        return self._alive[: self.count]

    @property
    def keys(self) -> np.ndarray:
        return self._keys[: self.count]

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The store keys of rows (any shape); -1 stays -1 (padding)."""
        keys = self.keys[np.where(rows < 0, 0, rows)]
        return np.where(rows < 0, -1, keys)

    def row_of(self, key: int) -> int | None:
        return self._row_of_key.get(key)

    def key_of_id(self, product_id: str) -> int | None:
        """The store key of a live product, by id; None for unknown and deleted ids."""
        return self._key_of_id.get(product_id)

    def product_ids(self, rows: np.ndarray) -> np.ndarray:
        """Product ids (UTF-8 bytes) of rows of this catalog, for in-process callers; b"" for
        padding."""
        flat = rows.reshape(-1)
        ids = np.empty(len(flat), dtype=object)
        for i, row in enumerate(flat.tolist()):
            if row < 0:
                ids[i] = b""
            elif row < self.base_count:
                ids[i] = self.base.ids[row]
            else:
                ids[i] = self._delta_ids[row - self.base_count]
        return ids.reshape(rows.shape)

    def product_ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Product ids of live products' store keys (any shape; -1 and unknown keys: b"")."""
        rows = np.array(
            [self._row_of_key.get(key, -1) for key in keys.reshape(-1).tolist()], dtype=np.int64
        )
        return self.product_ids(rows).reshape(keys.shape)

    # --- applying changes ---------------------------------------------------------------------

    def apply(self, changes: Sequence[Any]) -> int:
        """Applies store changes (ecomsearch.store.StoredProduct, ascending seq; each the
        product's state after that change) with seq above applied_seq; returns how many."""
        fresh = [c for c in changes if c.seq > self.applied_seq]
        if not fresh:
            return 0
        # Each change is the product's whole state: of a product changed twice in one batch,
        # only the last counts (its earlier state, appended, would stay alive beside it).
        latest = {c.key: c for c in fresh}
        appended: list[Any] = []
        for change in sorted(latest.values(), key=lambda c: c.seq):
            row = self._row_of_key.pop(change.key, None)
            if row is not None:
                self._alive[row] = False
                self._all_alive = False
            if change.deleted:
                self._key_of_id.pop(change.id, None)
            else:
                if change.embedding is None or change.embedding.shape != (self.dimension,):
                    raise ValueError(
                        f"change {change.seq} of product {change.id!r} has no "
                        f"{self.dimension}-d embedding"
                    )
                self._row_of_key[change.key] = self.count + len(appended)
                self._key_of_id[change.id] = change.key
                appended.append(change)
        self._append(appended)
        self.applied_seq = fresh[-1].seq
        return len(fresh)

    def _append(self, changes: list[Any]) -> None:
        if not changes:
            return
        start, end = self.count, self.count + len(changes)
        if end > len(self._keys):
            capacity = max(end, 2 * len(self._keys))
            self._keys = np.resize(self._keys, capacity)
            alive = np.ones(capacity, dtype=bool)
            alive[: len(self._alive)] = self._alive
            self._alive = alive
        delta_start, delta_end = start - self.base_count, end - self.base_count
        if delta_end > len(self._delta_vectors):
            grown = np.empty((max(delta_end, 2 * len(self._delta_vectors)), self.dimension))
            grown = grown.astype(np.float32)
            grown[:delta_start] = self._delta_vectors[:delta_start]
            self._delta_vectors = grown
        self._keys[start:end] = [c.key for c in changes]
        self._alive[start:end] = True
        self._delta_vectors[delta_start:delta_end] = np.stack([c.embedding for c in changes])
        self._delta_ids.extend(c.id.encode("utf-8") for c in changes)
        products = [catalog_product(c) for c in changes]
        self.lexical.delta.append(products)
        self.columns.append(
            [p.brand for p in products],
            [p.category_path for p in products],
            [p.price for p in products],
            [p.in_stock for p in products],
        )
        self.delta_rows += len(changes)

    # --- searching ------------------------------------------------------------------------------

    def allowed(self, search_filter: SearchFilter = NO_FILTER) -> np.ndarray | None:
        """bool [count]: live rows passing the filter; None when that is every row."""
        if not search_filter.active:
            # Nothing dead (no product changed or deleted yet): no mask, the plain search.
            # Otherwise the live mask itself: callers only read it, under the model's lock.
            return None if self._all_alive else self.alive
        return self.alive & self.columns.mask(search_filter)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        in_base = rows < self.base_count
        if in_base.all():
            return self.base_vectors[rows]
        out = np.empty((len(rows), self.dimension), dtype=np.float32)
        out[in_base] = self.base_vectors[rows[in_base]]
        out[~in_base] = self._delta_vectors[rows[~in_base] - self.base_count]
        return out

    def search(
        self, embeddings: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product among `allowed` rows (all rows when None): scores [n, k]
        float32 and rows [n, k] int64, padded with -inf / -1 when fewer rows are allowed.

        Exact over the allowed rows whenever the base index is exact (flat); the base is
        searched with a FAISS ID selector and, for a query where that comes back short of the
        allowed rows it could have returned (an HNSW walk) or returns others (a GPU index
        ignores the selector), exactly over the allowed rows instead."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        base_scores, base_rows = self._search_base(
            embeddings, k, None if allowed is None else allowed[: self.base_count]
        )
        if not self.delta_rows:
            return base_scores, base_rows
        delta_allowed = self.alive if allowed is None else allowed
        delta_rows = np.flatnonzero(delta_allowed[self.base_count :])
        if not len(delta_rows):
            return base_scores, base_rows
        delta_scores = embeddings @ self._delta_vectors[delta_rows].T
        rows = np.broadcast_to(delta_rows + self.base_count, delta_scores.shape)
        return top_k(
            np.concatenate([base_scores, delta_scores.astype(np.float32)], axis=1),
            np.concatenate([base_rows, rows], axis=1),
            k,
        )

    def _search_base(
        self, embeddings: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        n, index = len(embeddings), self.base.faiss_index
        if self._scan is not None:
            return self._scan_and_rescore(embeddings, k, allowed)
        if allowed is None:
            scores, rows = index.search(embeddings, min(k, self.base_count))
            return _pad(scores, rows, k)
        allowed_count = int(np.count_nonzero(allowed))
        if allowed_count == 0:
            return _pad(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64), k)
        exact = self.base.manifest.index_type == "flat"
        if not exact and allowed_count <= EXACT_SUBSET_MAX_ROWS:
            return self._search_subset(embeddings, k, np.flatnonzero(allowed))
        bitmap = np.packbits(allowed, bitorder="little")  # referenced until the search returns
        selector = faiss.IDSelectorBitmap(self.base_count, faiss.swig_ptr(bitmap))
        if exact:
            params = faiss.SearchParameters(sel=selector)
        else:
            ef_search = int(self.base.manifest.index_params.get("ef_search", 16))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef_search, k))
        want = min(k, allowed_count)
        scores, rows = index.search(embeddings, want, params=params)
        # An HNSW walk restricted to a subset can come back short, and a GPU index ignores the
        # selector altogether (faiss issues 3114 and 3924): a query with fewer than `want`
        # allowed rows is searched again, exactly, over the allowed rows.
        found = rows >= 0
        passing = found & allowed[np.where(found, rows, 0)]
        redo = np.flatnonzero(passing.sum(axis=1) < want)
        if len(redo):
            subset = np.flatnonzero(allowed)
            fixed_scores, fixed_rows = self._search_subset(embeddings[redo], want, subset)
            scores[redo], rows[redo] = fixed_scores, fixed_rows
        return _pad(scores, rows, k)

    def _scan_and_rescore(
        self, embeddings: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of a flat base: the float16 scan's k + margin best, rescored in float32."""
        import faiss

        n = len(embeddings)
        allowed_count = self.base_count if allowed is None else int(np.count_nonzero(allowed))
        if allowed_count == 0:
            return _pad(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64), k)
        want = min(k + max(1, int(k * SCAN_MARGIN_FRACTION)), allowed_count)
        if allowed is None:
            _, rows = self._scan.search(embeddings, want)
        else:
            bitmap = np.packbits(allowed, bitorder="little")  # referenced until it returns
            selector = faiss.IDSelectorBitmap(self.base_count, faiss.swig_ptr(bitmap))
            _, rows = self._scan.search(
                embeddings, want, params=faiss.SearchParameters(sel=selector)
            )
        rows = rows.astype(np.int64, copy=False)
        found = rows >= 0
        vectors = self.base_vectors[np.where(found, rows, 0)]  # [n, want, d]
        scores = np.einsum("nwd,nd->nw", vectors, embeddings).astype(np.float32)
        return top_k(np.where(found, scores, -np.inf), np.where(found, rows, -1), k)

    def _search_subset(
        self, embeddings: np.ndarray, k: int, subset: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = embeddings @ self.base_vectors[subset].T
        rows = np.broadcast_to(subset.astype(np.int64), scores.shape)
        return top_k(scores.astype(np.float32), rows, k)


def half_precision_scan(faiss_index: Any, vectors: np.ndarray) -> Any:
    """A float16 copy of a flat CPU index's vectors to scan instead of it (see
    SCAN_MARGIN_FRACTION); None for any other index (HNSW, or one on a GPU)."""
    import faiss

    if not isinstance(faiss_index, faiss.IndexFlat) or not len(vectors):
        return None
    scan = faiss.IndexScalarQuantizer(
        vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    scan.add(vectors)
    return scan


def _pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.int64, copy=False)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    if rows.shape[1] == k:
        return scores, rows
    n = len(rows)
    padded_scores = np.full((n, k), -np.inf, dtype=np.float32)
    padded_rows = np.full((n, k), -1, dtype=np.int64)
    padded_scores[:, : rows.shape[1]], padded_rows[:, : rows.shape[1]] = scores, rows
    return padded_scores, padded_rows
