"""The live catalog (ecomsearch.live.catalog): a built base index plus the store's changes since,
checked against a brute-force model of the live products: which products are live, their
vectors, exact (filtered) vector search, BM25 of new products with the base's statistics, and
the candidates HybridRetriever makes from all of it.

Base indexes here are written by the real writer with store keys that are not the rows (they
start at 100, in shuffled order), so a row read as a key, or a key as a row, shows."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecomsearch.catalog import Product
from ecomsearch.index.builder import CatalogSnapshot, write_index
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import FIELDS, field_texts, tokenize
from ecomsearch.live import catalog as live_catalog
from ecomsearch.live.catalog import LiveCatalog, top_k
from ecomsearch.live.filters import NO_FILTER, SearchFilter
from ecomsearch.ranking.candidates import HybridRetriever
from ecomsearch.ranking.features import FEATURE_NAMES
from ecomsearch.store import StoredProduct

DIMENSION = 8
BASE_PRODUCTS = 30
WORDS = ["cordless", "drill", "hammer", "garden", "hose", "led", "bulb", "saw", "blade", "18v"]
NEW_WORDS = ["zircon", "quartz"]  # in no base product: BM25 knows them from the delta only
BRANDS = ["Acme", "Bosch", "DeWalt", ""]
CATEGORIES = [(), ("Tools",), ("Tools", "Drills"), ("Tools", "Saws"), ("Garden", "Hoses")]
PRICES = [None, 0.0, 4.99, 5.0, 19.99, 120.0]
NEW_KEYS = [900, 901, 902, 903, 904]
VECTOR_POOL, LEXICAL_POOL = 6, 5


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(vectors).astype(np.float64)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def random_product(rng: np.random.Generator, product_id: str, words=WORDS) -> Product:
    title = " ".join(rng.choice(words, size=rng.integers(1, 4)))
    path = CATEGORIES[rng.integers(len(CATEGORIES))]
    return Product(
        id=product_id,
        title=title.capitalize(),
        brand=str(rng.choice(BRANDS)),
        category=" > ".join(path),
        description=str(rng.choice(["", "steel", "for wood and metal", "2.5 in blade"])),
        price=PRICES[rng.integers(len(PRICES))],
        in_stock=bool(rng.integers(4)),
    )


@dataclass(frozen=True)
class Base:
    """A base index on disk, loaded, and the products and vectors it was built from."""

    index: CatalogIndex
    lexical: Any
    products: dict[int, Product]  # by store key
    vectors: dict[int, np.ndarray]

    def live(self) -> LiveCatalog:
        """A fresh LiveCatalog over this base (loading it is the slow part, done once)."""
        return LiveCatalog(self.index, self.lexical)


def write_base(
    index_dir: Path,
    products: list[Product],
    keys: list[int],
    vectors: np.ndarray,
    exact_max_products: int = 50_000,
) -> Base:
    snapshot = CatalogSnapshot(products, np.array(keys), vectors, "encoder", "catalog")
    write_index(index_dir, snapshot, exact_max_products)
    index = CatalogIndex.load(index_dir)
    return Base(
        index,
        index.load_lexical(),
        dict(zip(keys, products, strict=True)),
        dict(zip(keys, vectors, strict=True)),
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    rng = np.random.default_rng(7)
    keys = (100 + 3 * rng.permutation(BASE_PRODUCTS)).tolist()
    products = [random_product(rng, f"sku-{key}") for key in keys]
    vectors = unit(rng.normal(size=(BASE_PRODUCTS, DIMENSION)))
    return write_base(tmp_path_factory.mktemp("live") / "index", products, keys, vectors)


# --- the brute-force model -------------------------------------------------------------------


def change(key: int, seq: int, product: Product | None, vector=None) -> StoredProduct:
    """A store change: the product's state after it (None: deleted)."""
    if product is None:
        return StoredProduct(key=key, id=f"sku-{key}", seq=seq, deleted=True, title="")
    return StoredProduct(
        key=key,
        id=product.id,
        seq=seq,
        deleted=False,
        title=product.title,
        brand=product.brand,
        category_path=product.category_path,
        description=product.description,
        price=product.price,
        in_stock=product.in_stock,
        embedding=np.asarray(vector, dtype=np.float32),
    )


class Expected:
    """The live products and vectors by key, as the changes leave them."""

    def __init__(self, base: Base) -> None:
        self.products = dict(base.products)
        self.vectors = dict(base.vectors)

    def apply(self, changes: list[StoredProduct]) -> None:
        for c in changes:
            if c.deleted:
                self.products.pop(c.key, None)
                self.vectors.pop(c.key, None)
            else:
                self.products[c.key] = Product(
                    id=c.id,
                    title=c.title,
                    brand=c.brand,
                    category=" > ".join(c.category_path),
                    description=c.description,
                    price=c.price,
                    in_stock=c.in_stock,
                )
                self.vectors[c.key] = c.embedding

    def passing(self, raw: dict) -> list[int]:
        return sorted(key for key, p in self.products.items() if passes(p, **raw))


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def passes(product: Product, category="", brand="", min_price=None, max_price=None, stock=False):
    """What a filter means, spelled out over one product (raw request values)."""
    if brand and fold(product.brand) != fold(brand):
        return False
    wanted = [fold(level) for level in category.split(">") if level.strip()]
    have = [fold(level) for level in product.category.split(">") if level.strip()]
    if have[: len(wanted)] != wanted:
        return False
    # Prices compare as FP32, the precision they travel in.
    price = None if product.price is None else np.float32(product.price)
    if min_price is not None and (price is None or price < np.float32(min_price)):
        return False
    if max_price is not None and (price is None or price > np.float32(max_price)):
        return False
    return not stock or product.in_stock


def parse(raw: dict) -> SearchFilter:
    return SearchFilter.parse(
        raw.get("category"),
        raw.get("brand"),
        raw.get("min_price"),
        raw.get("max_price"),
        raw.get("stock", False),
    )


class Bm25:
    """BM25 (Lucene's idf, bm25s's defaults) of any product with the base's statistics: its
    document count, document frequencies and average lengths."""

    def __init__(self, base: Base) -> None:
        self.k1 = {f: float(base.lexical.retrievers[f].k1) for f in FIELDS}
        self.b = {f: float(base.lexical.retrievers[f].b) for f in FIELDS}
        documents = {
            f: [tokenize(field_texts(p)[f]) for p in base.products.values()] for f in FIELDS
        }
        self.count = len(base.products)
        self.frequency = {f: Counter(t for d in documents[f] for t in set(d)) for f in FIELDS}
        self.average = {f: np.mean([len(d) for d in documents[f]]) for f in FIELDS}

    def score(self, product: Product, query: str, field: str) -> float:
        document = Counter(tokenize(field_texts(product)[field]))
        length, total = sum(document.values()), 0.0
        norm = self.k1[field] * (1 - self.b[field] + self.b[field] * length / self.average[field])
        for token in dict.fromkeys(tokenize(query)):
            tf = document[token]
            if tf:
                df = self.frequency[field][token]
                idf = math.log(1 + (self.count - df + 0.5) / (df + 0.5))
                total += idf * tf / (tf + norm)
        return total


# --- checks -----------------------------------------------------------------------------------


def assert_exact_search(catalog: LiveCatalog, expected: Expected, raw: dict, k: int, seed: int):
    """catalog.search under the filter is the exact top-k of the live products passing it:
    min(k, passing) distinct passing keys whose scores are their true scores and the best
    ones (ties may go either way), then padding."""
    keys = expected.passing(raw)
    queries = unit(np.random.default_rng(seed).normal(size=(3, DIMENSION)))
    scores, rows = catalog.search(queries, k, catalog.allowed(parse(raw)))
    assert scores.shape == rows.shape == (3, k)
    found = min(k, len(keys))
    for i, query in enumerate(queries):
        truth = {key: float(expected.vectors[key] @ query) for key in keys}
        returned = catalog.keys_of(rows[i, :found]).tolist()
        assert len(set(returned)) == found and set(returned) <= set(keys), raw
        np.testing.assert_allclose(scores[i, :found], [truth[key] for key in returned], atol=1e-5)
        best = sorted(truth.values(), reverse=True)[:found]
        np.testing.assert_allclose(scores[i, :found], best, atol=1e-5)
        assert (rows[i, found:] == -1).all() and np.isneginf(scores[i, found:]).all()


def assert_live_rows(catalog: LiveCatalog, expected: Expected) -> None:
    """Exactly one live row per live product, holding its current vector, id and key."""
    alive_keys = catalog.keys[catalog.alive].tolist()
    assert sorted(alive_keys) == sorted(expected.products)
    assert catalog.live_count == len(expected.products)
    for key, product in expected.products.items():
        row = catalog.row_of(key)
        assert row is not None and catalog.alive[row]
        assert catalog.keys_of(np.array([row])).tolist() == [key]
        np.testing.assert_array_equal(catalog.vectors(np.array([row]))[0], expected.vectors[key])
        assert catalog.product_ids(np.array([row])).tolist() == [product.id.encode()]
    gone = set(catalog.keys.tolist()) - set(expected.products)
    assert all(catalog.row_of(key) is None for key in gone)


# --- hypothesis: changes, filters --------------------------------------------------------------


@st.composite
def product_states(draw, key: int) -> tuple[Product, np.ndarray]:
    words = st.sampled_from(WORDS + NEW_WORDS)
    product = Product(
        id=f"sku-{key}",
        title=" ".join(draw(st.lists(words, min_size=1, max_size=3))),
        brand=draw(st.sampled_from(BRANDS)),
        category=" > ".join(draw(st.sampled_from(CATEGORIES))),
        description=draw(st.sampled_from(["", "steel", "zircon blade"])),
        price=draw(st.sampled_from(PRICES)),
        in_stock=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return product, unit(np.random.default_rng(seed).normal(size=DIMENSION))[0]


@st.composite
def change_batches(draw, base_keys: list[int]) -> list[list[StoredProduct]]:
    """Batches of store changes: upserts of base and new products, deletes of live ones (a
    store only logs a delete of a live product), in seq order; a product may change several
    times, within a batch too, and be deleted and inserted again."""
    live, changes = set(base_keys), []
    for seq in range(1, draw(st.integers(0, 14)) + 1):
        key = draw(st.sampled_from(base_keys[:6] + NEW_KEYS))
        if key in live and draw(st.integers(0, 2)) == 0:
            changes.append(change(key, seq, None))
            live.discard(key)
        else:
            changes.append(change(key, seq, *draw(product_states(key))))
            live.add(key)
    cuts = sorted(draw(st.lists(st.integers(0, len(changes)), max_size=3)))
    bounds = [0, *cuts, len(changes)]
    return [changes[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def raw_filters(draw, products: list[Product]) -> dict:
    """Filters of every kind and selectivity, mostly from values the products have."""
    known = draw(st.sampled_from(products)) if products else Product(id="x", title="x")
    raw: dict = {}
    if draw(st.booleans()):
        levels = known.category_path[: draw(st.integers(1, 2))] or ("Tools",)
        raw["category"] = draw(st.sampled_from([" > ", ">"])).join(
            draw(st.sampled_from([level, level.upper(), f" {level.lower()} "])) for level in levels
        )
    if draw(st.booleans()):
        brand = draw(st.sampled_from([known.brand or "Acme", "Nobody"]))
        raw["brand"] = draw(st.sampled_from([brand, brand.upper(), f"  {brand.lower()}"]))
    prices = st.sampled_from([p for p in PRICES if p is not None] + [10.0])
    low, high = draw(st.one_of(st.none(), prices)), draw(st.one_of(st.none(), prices))
    if low is not None and high is not None and low > high:
        low, high = high, low
    raw["min_price"], raw["max_price"] = low, high
    raw["stock"] = draw(st.booleans())
    return raw


LIVE_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@LIVE_SETTINGS
@given(data=st.data())
def test_search_over_base_and_changes_is_exact_over_the_live_products(base: Base, data) -> None:
    catalog, expected = base.live(), Expected(base)
    for batch in data.draw(change_batches(list(base.products))):
        catalog.apply(batch)
        expected.apply(batch)
        assert_live_rows(catalog, expected)

    k = data.draw(st.sampled_from([1, 5, 40]))
    assert_exact_search(catalog, expected, {}, k, seed=data.draw(st.integers(0, 99)))
    raw = data.draw(raw_filters(list(expected.products.values())))
    assert_exact_search(catalog, expected, raw, k, seed=data.draw(st.integers(0, 99)))
    allowed = catalog.allowed(parse(raw))
    rows = np.arange(catalog.count) if allowed is None else np.flatnonzero(allowed)
    assert sorted(catalog.keys[rows].tolist()) == expected.passing(raw)


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[..., FEATURE_NAMES.index(name)]


def changes_of_every_kind(base: Base) -> list[list[StoredProduct]]:
    """New products (some with words no base product has), changed text, price and stock,
    deletes, a delete then a re-insert, a product changed twice (in one batch and across
    batches), a new product changed again."""
    rng = np.random.default_rng(11)
    keys = list(base.products)

    def state(key: int, words=WORDS) -> tuple[Product, np.ndarray]:
        return random_product(rng, f"sku-{key}", words), unit(rng.normal(size=DIMENSION))[0]

    retitled = replace(base.products[keys[0]], title="Zircon drill")
    repriced = replace(base.products[keys[1]], price=1.0, in_stock=False)
    return [
        [change(900, 1, *state(900, NEW_WORDS + WORDS)), change(901, 2, *state(901))],
        [
            change(keys[0], 3, retitled, base.vectors[keys[0]]),
            change(keys[1], 4, repriced, base.vectors[keys[1]]),
            change(keys[2], 5, None),
            change(keys[3], 6, None),
        ],
        [change(keys[3], 7, *state(keys[3])), change(keys[4], 8, *state(keys[4]))],
        [change(keys[4], 9, *state(keys[4])), change(keys[4], 10, *state(keys[4]))],
        [change(900, 11, *state(900, NEW_WORDS)), change(902, 12, *state(902, NEW_WORDS))],
    ]


def apply_changes(catalog: LiveCatalog, base: Base) -> Expected:
    expected = Expected(base)
    for batch in changes_of_every_kind(base):
        assert catalog.apply(batch) == len(batch)
        expected.apply(batch)
    return expected


@pytest.fixture(scope="module")
def changed(base: Base) -> tuple[LiveCatalog, Expected]:
    """The base with changes_of_every_kind applied."""
    catalog = base.live()
    return catalog, apply_changes(catalog, base)


@pytest.fixture(scope="module")
def oracle(base: Base) -> Bm25:
    return Bm25(base)


def test_the_changed_catalog_holds_exactly_the_live_products(changed, base: Base) -> None:
    catalog, expected = changed
    assert_live_rows(catalog, expected)
    keys = list(base.products)
    assert catalog.row_of(keys[2]) is None, "deleted"
    assert catalog.row_of(keys[3]) >= catalog.base_count, "deleted, then inserted again"
    # Every upsert appends a row (superseded ones stay, dead), but of a product changed twice
    # in one batch only the last state: ten upserts, nine rows.
    assert catalog.delta_rows == 9
    assert catalog.applied_seq == 12


def test_changes_already_applied_are_skipped(base: Base) -> None:
    catalog = base.live()
    first = [change(900, 1, *product_and_vector(900))]
    assert catalog.apply(first) == 1
    assert catalog.apply(first) == 0 and catalog.delta_rows == 1
    again = [first[0], change(901, 2, *product_and_vector(901))]
    assert catalog.apply(again) == 1 and catalog.delta_rows == 2 and catalog.applied_seq == 2


def product_and_vector(key: int) -> tuple[Product, np.ndarray]:
    rng = np.random.default_rng(key)
    return random_product(rng, f"sku-{key}"), unit(rng.normal(size=DIMENSION))[0]


def test_a_change_without_a_vector_of_the_index_dimension_is_refused(base: Base) -> None:
    catalog = base.live()
    product, _ = product_and_vector(900)
    with pytest.raises(ValueError, match=f"no {DIMENSION}-d embedding"):
        catalog.apply([change(900, 1, product, np.ones(DIMENSION + 1))])


def test_a_static_index_has_its_rows_as_keys_and_nothing_to_mask(tmp_path, tiny_index_factory):
    tiny = tiny_index_factory(tmp_path / "index", "encoder", rows=5, dimension=DIMENSION)
    catalog = LiveCatalog.load(CatalogIndex.load(tiny.index_dir))
    assert catalog.applied_seq == 0 and catalog.keys.tolist() == [0, 1, 2, 3, 4]
    assert catalog.allowed(NO_FILTER) is None, "the unfiltered search needs no selector"
    rows = np.array([[3, -1], [0, 4]])
    assert catalog.keys_of(rows).tolist() == [[3, -1], [0, 4]]


@LIVE_SETTINGS
@given(data=st.data())
def test_filtered_retrieval_is_exact_and_as_long_as_the_products_allow(
    changed, oracle: Bm25, data
) -> None:
    """HybridRetriever over the changed catalog: per query, the vector list is the exact
    top min(pool, passing) of the live products passing its filter; the BM25 list holds the
    best BM25 matches among them (scored with the base's statistics, delta products too); no
    candidate fails its filter, is dead, or appears twice."""
    catalog, expected = changed
    retriever = HybridRetriever(catalog, VECTOR_POOL, LEXICAL_POOL)
    products = list(expected.products.values())
    raws = data.draw(st.lists(raw_filters(products), min_size=1, max_size=3))
    words = st.sampled_from(WORDS + NEW_WORDS + ["steel"])
    queries = [" ".join(data.draw(st.lists(words, min_size=1, max_size=3))) for _ in raws]
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    embeddings = unit(rng.normal(size=(len(raws), DIMENSION)))

    batch = retriever.retrieve(queries, embeddings, [parse(raw) for raw in raws])

    for i, (raw, query) in enumerate(zip(raws, queries, strict=True)):
        passing = expected.passing(raw)
        keys = batch.rows[i][batch.rows[i] >= 0].tolist()
        assert len(set(keys)) == len(keys) and set(keys) <= set(passing), raw
        assert (batch.rows[i][len(keys) :] == -1).all(), "padding only at the end"
        found = min(VECTOR_POOL, len(passing))
        assert len(keys) >= found
        features = batch.features[i, : len(keys)]
        truth = {key: float(expected.vectors[key] @ embeddings[i]) for key in passing}
        cosine = column(features, "cosine")
        np.testing.assert_allclose(cosine, [truth[key] for key in keys], atol=1e-5)
        best = sorted(truth.values(), reverse=True)[:found]
        np.testing.assert_allclose(cosine[:found], best, atol=1e-5)

        tokens = list(dict.fromkeys(tokenize(query)))
        for field in FIELDS:
            products = [expected.products[key] for key in keys]
            scores = [oracle.score(product, query, field) for product in products]
            np.testing.assert_allclose(column(features, f"bm25_{field}"), scores, rtol=1e-5)
            texts = [set(tokenize(field_texts(product)[field])) for product in products]
            coverage = [np.mean([token in text for token in tokens]) for text in texts]
            np.testing.assert_allclose(column(features, f"{field}_coverage"), coverage, rtol=1e-6)

        listed = column(features, "lexical_rank") < np.log1p(LEXICAL_POOL) - 1e-6
        text = {key: oracle.score(expected.products[key], query, "text") for key in passing}
        matching = [key for key in passing if text[key] > 0]
        assert listed.sum() == min(LEXICAL_POOL, len(matching)), query
        in_list = [text[key] for key, on in zip(keys, listed, strict=True) if on]
        left_out = [text[key] for key in set(matching) - set(np.array(keys)[listed].tolist())]
        assert min(in_list, default=math.inf) >= max(left_out, default=0) - 1e-5, query


def test_a_new_product_scores_as_bm25s_scores_the_same_text_in_the_base(base: Base) -> None:
    """A delta product whose text is a base product's gets, for any query, exactly the BM25
    bm25s gives that base product: same statistics, same formula."""
    catalog = base.live()
    copies = {}
    for n, (key, product) in enumerate(list(base.products.items())[:8]):
        new_key = 900 + n
        copies[new_key] = key
        copy = replace(product, id=f"copy-{key}")
        catalog.apply([change(new_key, n + 1, copy, base.vectors[key])])
    queries = [*WORDS, "cordless drill", "garden hose 18v", "blade steel", "zircon drill", "tools"]
    lexical = catalog.lexical
    checked = 0
    for query in queries:
        terms = lexical.terms(query)
        for field in FIELDS:
            scores = lexical.scores(terms, field)
            assert scores.shape == (catalog.count,)
            for new_key, key in copies.items():
                new_row, row = catalog.row_of(new_key), catalog.row_of(key)
                assert scores[new_row] == pytest.approx(scores[row], rel=1e-5, abs=1e-7)
                checked += scores[row] > 0
    assert checked > 20, "test setup: the queries must match the copied products"


def test_a_new_product_scores_by_the_lucene_formula_with_the_base_statistics(
    base: Base, oracle: Bm25
) -> None:
    catalog = base.live()
    products = {
        900: Product(id="n0", title="Zircon drill drill", brand="Acme", category="Tools > Drills"),
        901: Product(id="n1", title="quartz", description="18v cordless hammer hammer hammer"),
        902: Product(id="n2", title="Led bulb"),
    }
    vector = unit(np.ones(DIMENSION))[0]
    catalog.apply([change(k, i + 1, p, vector) for i, (k, p) in enumerate(products.items())])
    for query in ["zircon drill", "drill", "quartz hammer", "hammer 18v", "led", "acme tools"]:
        terms = catalog.lexical.terms(query)
        for field in FIELDS:
            scores = catalog.lexical.scores(terms, field)
            for key, product in products.items():
                expected = oracle.score(product, query, field)
                assert scores[catalog.row_of(key)] == pytest.approx(expected, rel=1e-5), query
    # A word no base product has is rare, not unknown: it counts, with the highest idf.
    assert catalog.lexical.scores(catalog.lexical.terms("zircon"), "title")[catalog.row_of(900)] > 0


# --- approximate bases ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hnsw(tmp_path_factory) -> Base:
    rng = np.random.default_rng(3)
    count = 400
    keys = (1000 + rng.permutation(count)).tolist()
    products = [random_product(rng, f"h-{key}") for key in keys]
    # Two brands are rare: filters on them pass a handful of rows.
    for i in range(4):
        products[i * 50] = replace(products[i * 50], brand="Rare")
    vectors = unit(rng.normal(size=(count, DIMENSION)))
    base = write_base(tmp_path_factory.mktemp("hnsw") / "index", products, keys, vectors, 0)
    assert base.index.manifest.index_type == "hnsw"
    return base


def test_an_hnsw_base_under_a_very_selective_filter_returns_every_match(hnsw: Base) -> None:
    catalog, expected = hnsw.live(), Expected(hnsw)
    for raw in ({"brand": "rare"}, {"brand": "RARE", "stock": True}, {"brand": "Nobody"}):
        assert len(expected.passing(raw)) < 5
        assert_exact_search(catalog, expected, raw, 10, seed=1)


@pytest.mark.parametrize("raw", [{"brand": "rare"}, {"category": "tools"}, {"max_price": 5.0}])
def test_an_hnsw_search_through_the_id_selector_still_returns_min_k_matches(
    hnsw: Base, monkeypatch: pytest.MonkeyPatch, raw: dict
) -> None:
    """With the subset shortcut off, the filtered graph walk itself runs; when it comes back
    short, the allowed rows are searched exactly: never fewer than min(k, passing) results."""
    monkeypatch.setattr(live_catalog, "EXACT_SUBSET_MAX_ROWS", 0)
    catalog, expected = hnsw.live(), Expected(hnsw)
    passing = expected.passing(raw)
    queries = unit(np.random.default_rng(5).normal(size=(8, DIMENSION)))
    for k in (3, 50):
        _, rows = catalog.search(queries, k, catalog.allowed(parse(raw)))
        found = min(k, len(passing))
        assert ((rows >= 0).sum(axis=1) == found).all(), (raw, k)
        assert set(catalog.keys_of(rows[rows >= 0]).tolist()) <= set(passing)


class SelectorIgnoringIndex:
    """A flat index as a GPU holds it: not an IndexFlat (its vectors are copied out), and it
    ignores search parameters, an ID selector included (faiss issues 3114 and 3924)."""

    def __init__(self, index) -> None:
        self.index, self.ntotal, self.d = index, index.ntotal, index.d

    def search(self, embeddings, k, params=None):
        return self.index.search(embeddings, k)

    def reconstruct_n(self, start: int, count: int) -> np.ndarray:
        return self.index.reconstruct_n(start, count)


def test_filters_stay_exact_over_an_index_that_ignores_the_id_selector(base: Base) -> None:
    gpu_like = replace(base.index, faiss_index=SelectorIgnoringIndex(base.index.faiss_index))
    catalog = LiveCatalog(gpu_like, base.lexical)
    expected = apply_changes(catalog, base)
    for raw in ({}, {"stock": True}, {"category": "tools"}, {"min_price": 5.0}):
        assert_exact_search(catalog, expected, raw, 7, seed=3)


def test_top_k_keeps_the_best_and_pads() -> None:
    scores = np.array([[0.5, 0.9, 0.1, 0.9], [0.3, -1.0, 0.0, 0.0]], dtype=np.float32)
    rows = np.array([[4, 7, 2, 3], [5, -1, -1, -1]])
    top_scores, top_rows = top_k(scores, rows, 3)
    assert top_rows.tolist() == [[3, 7, 4], [5, -1, -1]]  # a tie goes to the lower row
    assert top_scores[0].tolist() == pytest.approx([0.9, 0.9, 0.5])
    assert np.isneginf(top_scores[1, 1:]).all()


def test_a_flat_base_scanned_in_float16_returns_the_exact_top_k_and_scores(
    tmp_path, tiny_index_factory
) -> None:
    # Clustered vectors, so many scores crowd around the k-th: where float16 could reorder.
    from ecomsearch.live.catalog import half_precision_scan
    from ecomsearch.loadtest.scaling import clustered_unit_vectors

    rng = np.random.default_rng(5)
    centres = rng.normal(0, 1, (20, 64)).astype(np.float32)
    vectors = clustered_unit_vectors(4000, 6, centres)
    tiny = tiny_index_factory(tmp_path / "index", "encoder", embeddings=vectors)
    catalog = LiveCatalog.load(CatalogIndex.load(tiny.index_dir))
    assert half_precision_scan(catalog.base.faiss_index, catalog.base_vectors) is not None
    queries = clustered_unit_vectors(30, 7, centres)
    allowed = rng.random(4000) < 0.3
    for mask in (None, allowed):
        scores, rows = catalog.search(queries, 200, mask)
        exact = queries @ vectors.T
        if mask is not None:
            exact[:, ~mask] = -np.inf
        for i in range(len(queries)):
            # The exact top 200 up to float32 ties (sums in another order move a score ~1e-7):
            # the same 200 best scores, each the returned row's own exact score.
            expected = np.sort(exact[i])[::-1][:200]
            np.testing.assert_allclose(scores[i], expected, rtol=0, atol=1e-6)
            np.testing.assert_allclose(exact[i, rows[i]], scores[i], rtol=0, atol=1e-6)
            assert len(set(rows[i].tolist())) == 200
