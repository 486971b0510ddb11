"""The product-text tokenizer and the per-field BM25 indexes (ecomsearch.lexical)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.lexical import FIELDS, LexicalIndex, field_texts, is_number, tokenize

CATALOG = [
    Product(id="p0", title="Cordless drill 18 volt", brand="Makita", category="Tools > Drills"),
    Product(id="p1", title="Drill bits, 1/4 in.", description="Set of 10 for wood and steel"),
    Product(id="p2", title="Claw hammer", description="Forged steel; fits cordless tool belts"),
    Product(id="p3", title="Garden hoses 50 ft", brand="Flexi"),
    Product(id="p4", title="The A"),  # only stopwords: no tokens, but keeps its row
    Product(id="p5", title='Wood screws 3/4"', category="Hardware > Fasteners"),
]


@pytest.fixture(scope="module")
def lexical() -> LexicalIndex:
    return LexicalIndex.build(CATALOG)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("12 inch", ["12", "in"]),
        ("12 inches", ["12", "in"]),
        ("12 in.", ["12", "in"]),
        ('12"', ["12", "in"]),
        ('12" pipe', ["12", "in", "pipe"]),
        ("1tb nvme", ["1", "tb", "nvme"]),
        ("2 terabytes", ["2", "tb"]),
        ("3/4 in. MDF", ["3/4", "in", "mdf"]),
        ("2.5 gallons", ["2.5", "gal"]),
        ("10 feet", ["10", "ft"]),
        ("50 lbs", ["50", "lb"]),
        ("18 volts 60 watts", ["18", "v", "60", "w"]),
        ("2x4", ["2", "x", "4"]),
        ("mowers", ["mower"]),
        ("batteries", ["battery"]),
        ("glass", ["glass"]),
        ("bus", ["bus"]),
        ("tennis", ["tennis"]),
        ("bits", ["bit"]),
        ("Café", ["café"]),
        ("the saw for a deck and the rail", ["saw", "deck", "rail"]),
        ("of to on by or with an", []),
        ("", []),
        ("drill_bit-set", ["drill", "bit", "set"]),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_is_number() -> None:
    assert [is_number(t) for t in ["3/4", "2.5", "12", "tb", "x"]] == [True] * 3 + [False] * 2


def test_field_texts_index_the_title_alone_and_all_text_together() -> None:
    texts = field_texts(CATALOG[0])
    assert texts["title"] == "Cordless drill 18 volt"
    assert texts["text"] == "Cordless drill 18 volt Makita Tools > Drills"
    assert set(texts) == set(FIELDS)


def test_terms_are_distinct_in_query_order_with_numbers_apart(lexical) -> None:
    terms = lexical.terms("Drill 18 DRILL volts zzzz")
    assert terms.tokens == ("drill", "18", "v", "zzzz")
    assert terms.numbers == ("18",)
    # Ids only for words each field has: "zzzz" is nowhere; "v" (volt) is in title and text.
    for field in FIELDS:
        vocab = lexical.retrievers[field].vocab_dict
        assert terms.ids[field] == [vocab[t] for t in ("drill", "18", "v")]


def test_every_product_keeps_its_row(lexical) -> None:
    assert lexical.count == len(CATALOG)
    for field in FIELDS:
        assert lexical.scores(lexical.terms("drill"), field).shape == (len(CATALOG),)


def test_bm25_scores_only_products_with_a_query_word(lexical) -> None:
    title = lexical.scores(lexical.terms("cordless"), "title")
    text = lexical.scores(lexical.terms("cordless"), "text")
    assert title.dtype == text.dtype == np.float32
    assert np.flatnonzero(title).tolist() == [0]
    # p2 says "cordless" in its description only.
    assert np.flatnonzero(text).tolist() == [0, 2]


def test_a_product_matching_more_query_words_scores_higher(lexical) -> None:
    scores = lexical.scores(lexical.terms("cordless drill"), "title")
    assert scores[0] > scores[1] > 0
    assert scores[[2, 3, 4, 5]].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("query", ["zzzz", "quux blorp", "the and of"])
def test_unknown_query_words_give_zero_scores(lexical, query: str) -> None:
    terms = lexical.terms(query)
    for field in FIELDS:
        assert terms.ids[field] == []
        scores = lexical.scores(terms, field)
        assert scores.shape == (len(CATALOG),) and not scores.any()


def test_save_and_load_give_identical_scores(lexical, tmp_path: Path) -> None:
    lexical.save(tmp_path)
    loaded = LexicalIndex.load(tmp_path)

    assert loaded.count == lexical.count
    for field in FIELDS:  # what bm25s does not save, the live catalog's delta scoring needs
        assert loaded.parameters(field) == lexical.parameters(field)
    for query in ["cordless drill", "3/4 wood screws", "steel", "50 ft hose", "zzzz"]:
        for field in FIELDS:
            np.testing.assert_array_equal(
                loaded.scores(loaded.terms(query), field),
                lexical.scores(lexical.terms(query), field),
                err_msg=f"{query!r} {field}",
            )


def test_load_refuses_fields_with_different_document_counts(tmp_path: Path) -> None:
    LexicalIndex.build(CATALOG).save(tmp_path / "six")
    LexicalIndex.build(CATALOG[:3]).save(tmp_path / "three")
    (tmp_path / "six" / "text").rename(tmp_path / "six-text")
    (tmp_path / "three" / "text").rename(tmp_path / "six" / "text")
    with pytest.raises(ValueError, match="disagree"):
        LexicalIndex.load(tmp_path / "six")


def test_contains_agrees_with_a_brute_force_check(lexical) -> None:
    tokens = ["drill", "steel", "cordless", "in", "3/4", "1/4", "wood", "zzzz", "a"]
    rows = np.array([5, 0, 3, 2, 1, 4, 0])  # any order, repeats allowed
    for field in FIELDS:
        expected = np.array(
            [[token in tokenize(field_texts(CATALOG[r])[field]) for r in rows] for token in tokens]
        )
        present = lexical.contains(field, tokens, rows)
        assert present.dtype == bool and present.shape == (len(tokens), len(rows))
        np.testing.assert_array_equal(present, expected, err_msg=field)
        assert expected.any(), "test setup: some token must be present"


def test_contains_with_no_tokens_or_no_rows(lexical) -> None:
    assert lexical.contains("text", [], np.array([0, 1])).shape == (0, 2)
    assert lexical.contains("text", ["drill"], np.array([], dtype=np.int64)).shape == (1, 0)


def test_contains_sorts_unsorted_postings_first() -> None:
    """`contains` binary-searches postings; an index whose postings arrive unsorted is sorted
    (ids with their weights) when loaded, so answers and scores stay the same."""
    built = LexicalIndex.build(CATALOG)
    rows = np.arange(len(CATALOG))
    tokens = ["drill", "steel", "in", "wood"]
    expected = {field: built.contains(field, tokens, rows) for field in FIELDS}
    terms = built.terms("cordless drill steel")
    scores = {field: built.scores(terms, field) for field in FIELDS}
    for retriever in built.retrievers.values():
        matrix = retriever.scores
        for term in range(len(matrix["indptr"]) - 1):
            start, end = matrix["indptr"][term], matrix["indptr"][term + 1]
            matrix["indices"][start:end] = matrix["indices"][start:end][::-1].copy()
            matrix["data"][start:end] = matrix["data"][start:end][::-1].copy()
    reloaded = LexicalIndex(built.retrievers, built.average_lengths)
    for field in FIELDS:
        np.testing.assert_array_equal(reloaded.contains(field, tokens, rows), expected[field])
        np.testing.assert_allclose(reloaded.scores(terms, field), scores[field], rtol=1e-6)


# bm25s's internals (the score matrix, IDF) are read directly for speed; these tests pin what
# ecomsearch computes from them to bm25s's public scoring, so an upgrade that changes them
# fails here, loudly, rather than shifting features in production.

QUERY_TOKENS = ["drill", "steel", "cordless", "in", "3/4", "wood", "hose", "zzzz"]


def _documents(field: str) -> list[list[str]]:
    """What bm25s indexed for each product: its tokens (none for "The A", whose row bm25s keeps
    with length 0)."""
    return [tokenize(field_texts(p)[field]) for p in CATALOG]


@pytest.mark.parametrize("field", FIELDS)
def test_idf_is_the_one_bm25s_scores_with(lexical, field: str) -> None:
    retriever = lexical.retrievers[field]
    assert (retriever.method, retriever.idf_method) == ("lucene", "lucene")
    documents = _documents(field)
    lengths = np.array([len(d) for d in documents], dtype=np.float64)
    average = lengths.mean()
    # The statistics the live catalog scores new products with (ecomsearch.live.catalog).
    assert lexical.parameters(field) == pytest.approx((retriever.k1, retriever.b, average))
    idf = lexical.idf(field, QUERY_TOKENS)
    assert idf.shape == (len(QUERY_TOKENS),)
    checked = 0
    for token, weight in zip(QUERY_TOKENS, idf, strict=True):
        frequency = np.array([d.count(token) for d in documents], dtype=np.float64)
        document_frequency = int((frequency > 0).sum())
        expected_idf = np.log(
            1 + (len(documents) - document_frequency + 0.5) / (document_frequency + 0.5)
        )
        assert weight == pytest.approx(expected_idf, rel=1e-9), token
        if token not in retriever.vocab_dict:
            assert document_frequency == 0
            continue
        # BM25 (Lucene's form, without the constant k1 + 1) of a one-word query, from bm25s's
        # public scoring, must be this IDF times the term-frequency part: the IDF inside
        # bm25s's scores is the one computed here.
        scores = retriever.get_scores([token])
        k1, b = retriever.k1, retriever.b
        tf_part = frequency / (frequency + k1 * (1 - b + b * lengths / average))
        np.testing.assert_allclose(scores, weight * tf_part, rtol=1e-5, err_msg=token)
        checked += 1
    assert checked >= 4, "test setup: most query tokens must be in the vocabulary"


@pytest.mark.parametrize("field", FIELDS)
def test_scores_are_bm25s_own(lexical, field: str) -> None:
    retriever = lexical.retrievers[field]
    for query in ("cordless drill", "steel wood 3/4 in", "garden hoses zzzz", "the"):
        terms = lexical.terms(query)
        known = [t for t in terms.tokens if t in retriever.vocab_dict]
        ours = lexical.scores(terms, field)
        assert ours.dtype == np.float32 and ours.shape == (len(CATALOG),)
        if not known:
            assert not ours.any()
            continue
        np.testing.assert_allclose(ours, retriever.get_scores(known), rtol=1e-6, err_msg=query)


def test_the_bm25s_version_is_the_bounded_one() -> None:
    from importlib.metadata import version

    major, minor = (int(part) for part in version("bm25s").split(".")[:2])
    assert (major, minor) >= (0, 3) and (major, minor) < (0, 4)
