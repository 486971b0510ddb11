"""Query spelling correction against the catalog's vocabulary (ecomsearch.spelling), and its use
by the lexical index and the live catalog's newer products."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecomsearch.catalog import Product
from ecomsearch.lexical import LexicalIndex
from ecomsearch.spelling import (
    MAX_WORD_LENGTH,
    MIN_DOCUMENT_FREQUENCY,
    SpellingCorrector,
    allowed_edits,
    correctable,
    deletions,
    document_frequencies,
    edit_distance,
)

VOCABULARY = {
    "toilet": 40,
    "seat": 30,
    "vacuum": 12,
    "ceiling": 25,
    "fan": 50,
    "door": 60,
    "knob": 9,
    "rubbermaid": 4,
    "rubber": 7,
    "replacement": 20,
    "cabinet": 15,
    "cabinets": 2,  # the rarer of two words one edit away
    "cabinat": 1,  # a one-product word: a typo in the catalog is no correction target
    "led": 80,
    "padding": 0,
    "pudding": 3,
}


@pytest.fixture(scope="module")
def corrector() -> SpellingCorrector:
    return SpellingCorrector(VOCABULARY)


def osa_distance(a: str, b: str) -> int:
    """The reference: optimal string alignment over the full table, no cut-off."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                table[i][j] = min(table[i][j], table[i - 2][j - 2] + 1)
    return table[-1][-1]


words = st.text(alphabet="abcde", min_size=0, max_size=9)


@settings(max_examples=400, deadline=None)
@given(words, words, st.integers(0, 3))
def test_edit_distance_is_the_full_table_s_up_to_its_limit(a: str, b: str, limit: int) -> None:
    full = osa_distance(a, b)
    assert edit_distance(a, b, limit) == (full if full <= limit else limit + 1)


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("toliet", "toilet", 1), ("vaccuum", "vacuum", 1), ("celing", "ceiling", 1), ("", "ab", 2)],
)
def test_edit_distance_counts_a_transposition_insertion_or_deletion_once(a, b, distance) -> None:
    assert edit_distance(a, b, 3) == distance


def test_deletions_hold_every_string_left_by_up_to_n_deletions() -> None:
    assert deletions("abc", 1) == {"abc", "bc", "ac", "ab"}
    assert deletions("abc", 2) == {"abc", "bc", "ac", "ab", "a", "b", "c"}


@pytest.mark.parametrize(
    ("typed", "corrected"),
    [
        (["toliet", "seat"], ["toilet", "seat"]),  # a transposition
        (["vaccuum"], ["vacuum"]),  # an extra letter
        (["celing", "fan"], ["ceiling", "fan"]),  # a missing letter
        (["replacment"], ["replacement"]),
        (["replcment"], ["replacement"]),  # two edits: allowed from eight letters
        (["doorknob"], ["door", "knob"]),  # no word that close: split in two known words
        (["rubber", "maid"], ["rubbermaid"]),  # written apart: joined
        (["cabinrt"], ["cabinet"]),  # one edit from "cabinat" too, but one product's word
        (["padding"], ["pudding"]),  # in the vocabulary but in no document: unknown
    ],
)
def test_unknown_words_become_the_catalog_s_words(corrector, typed, corrected) -> None:
    assert corrector.correct(typed) == corrected


@pytest.mark.parametrize(
    "tokens",
    [
        ["toilet", "seat"],  # known words stay as typed
        ["led", "fan"],
        ["3/4", "in"],  # numbers and units
        ["sku", "fam"],  # under four letters
        ["x5000"],  # not only letters: model numbers are never "corrected"
        ["qwertyuiop"],  # nothing within reach: kept
        ["cabinat"],  # one product spells it so: a query that matches it is not "corrected"
    ],
)
def test_what_is_left_as_typed(corrector, tokens) -> None:
    assert corrector.correct(tokens) == tokens


def test_short_words_get_one_edit_long_words_two() -> None:
    assert allowed_edits("celing") == 1
    assert allowed_edits("replcment") == 2
    corrector = SpellingCorrector({"seat": 10, "ceiling": 10})
    assert corrector.correct(["seet"]) == ["seat"]
    assert corrector.correct(["slat"]) == ["seat"]
    assert corrector.correct(["sxxt"]) == ["sxxt"]  # two edits from a four-letter word: no
    assert corrector.correct(["cxxling"]) == ["cxxling"]  # seven letters: still one edit


def test_a_long_typo_never_becomes_a_short_word_two_edits_away() -> None:
    # "toiletxx" may have two edits, but "toilet" only one: a short word takes its own limit.
    corrector = SpellingCorrector({"toilet": 10, "replacement": 10})
    assert corrector.correct(["toiletxx"]) == ["toiletxx"]
    assert corrector.correct(["toiletx"]) == ["toilet"]
    assert corrector.correct(["replcment"]) == ["replacement"]


def test_ties_go_to_fewer_edits_then_more_documents_then_the_alphabet() -> None:
    corrector = SpellingCorrector({"bolt": 5, "boat": 9, "colt": 9, "belt": 9})
    assert corrector.correct(["bolx"]) == ["bolt"]  # one edit beats nothing closer
    assert corrector.correct(["boxt"]) == ["boat"]  # boat, bolt: one edit each; boat is used more
    assert corrector.correct(["xelt"]) == ["belt"]  # the only word one edit away
    tied = SpellingCorrector({"bake": 4, "cake": 4})
    assert tied.correct(["xake"]) == ["bake"]


def test_known_words_beyond_the_vocabulary_are_left_as_typed(corrector) -> None:
    assert corrector.correct(["toliet"], known={"toliet"}.__contains__) == ["toliet"]
    assert corrector.correct(["rubber", "maid"], known={"maid"}.__contains__) == [
        "rubber",
        "maid",
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="abcd", min_size=1, max_size=9), st.integers(0, 5), max_size=30
    ),
    st.text(alphabet="abcd", min_size=4, max_size=10),
)
def test_the_deletion_index_finds_what_a_scan_of_the_vocabulary_finds(vocabulary, word) -> None:
    corrector = SpellingCorrector(vocabulary)
    limit = allowed_edits(word)
    scanned = sorted(
        (osa_distance(word, candidate), -frequency, candidate)
        for candidate, frequency in vocabulary.items()
        if frequency >= MIN_DOCUMENT_FREQUENCY
        and correctable(candidate)
        and osa_distance(word, candidate) <= min(limit, allowed_edits(candidate))
    )
    assert corrector.closest(word) == (scanned[0][2] if scanned else None)


def test_document_frequencies_come_from_the_postings_offsets() -> None:
    offsets = np.array([0, 3, 3, 5])
    assert document_frequencies({"a": 0, "b": 1, "c": 2, "": 3, "d": 9}, offsets) == {
        "a": 3,
        "b": 0,
        "c": 2,
    }


CATALOG = [
    Product(id="p0", title="Cordless drill 18 volt", brand="Makita"),
    Product(id="p1", title="Drill bits", description="for cordless drivers"),
    Product(id="p2", title="Toilet seat, elongated"),
    Product(id="p3", title="Round toilet seat"),
]


def test_the_lexical_index_matches_a_misspelt_query_as_the_catalog_spells_it() -> None:
    lexical = LexicalIndex.build(CATALOG)
    typed = lexical.terms("toliet seat")
    spelt = lexical.terms("toilet seat")
    assert typed.tokens == ("toilet", "seat")
    assert typed.ids == spelt.ids
    assert np.array_equal(lexical.scores(typed, "title"), lexical.scores(spelt, "title"))
    assert lexical.scores(typed, "title")[2] > 0
    # Left as typed where the catalog has the word or no word is close.
    assert lexical.terms("cordless drill").tokens == ("cordless", "drill")
    assert lexical.terms("zzzzzz").tokens == ("zzzzzz",)


def test_a_word_only_a_newer_product_uses_is_not_corrected_away() -> None:
    from ecomsearch.live.catalog import DeltaLexical, LiveLexical

    base = LexicalIndex.build(CATALOG)
    live = LiveLexical(base, DeltaLexical(base))
    assert live.terms("toilex seat").tokens == ("toilet", "seat")
    live.delta.append([Product(id="p4", title="Toilex seat hinge")])  # a brand new since the build
    terms = live.terms("toilex seat")
    assert terms.tokens == ("toilex", "seat")
    assert np.argmax(live.scores(terms, "title")) == len(CATALOG)  # the new product


def test_the_word_as_typed_is_searched_too() -> None:
    # Plural folding makes "wireles" "wirele": two edits from "wireless", the typed word one.
    corrector = SpellingCorrector({"wireless": 10, "mouse": 10})
    assert corrector.correct(["wirele", "mouse"]) == ["wirele", "mouse"]
    assert corrector.correct(["wirele", "mouse"], typed=["wireles", "mouse"]) == [
        "wireless",
        "mouse",
    ]
    with pytest.raises(ValueError, match="typed words"):
        corrector.correct(["wirele", "mouse"], typed=["wireles"])
    lexical = LexicalIndex.build(
        [Product(id="m0", title="Wireless mouse"), Product(id="m1", title="Wireless keyboard")]
    )
    assert lexical.terms("wireles mouse").tokens == ("wireless", "mouse")


def test_overlong_words_cost_nothing_on_either_side(monkeypatch) -> None:
    # Deletion sets grow with the square of a word's length: a hostile 2,000-letter query word
    # (within the 2,048-byte limit), or such a word in a product's text, must never reach them.
    import ecomsearch.spelling as spelling

    # 60 letters: past the limit, yet cheap enough that this test fails fast without it.
    rng = np.random.default_rng(0)
    overlong = "".join(rng.choice(list("abcdefghij"), size=60))
    near = overlong[: MAX_WORD_LENGTH + 1]
    calls: list[str] = []
    original = spelling.deletions
    monkeypatch.setattr(
        spelling, "deletions", lambda word, edits: calls.append(word) or original(word, edits)
    )
    corrector = SpellingCorrector({overlong: 9, near: 9, "seat": 9})
    assert calls == ["seat"]  # the overlong vocabulary words were not indexed
    assert corrector.correct([overlong[:-1] + "z", near[:-1] + "z", "seet"]) == [
        overlong[:-1] + "z",
        near[:-1] + "z",
        "seat",
    ]
    assert calls == ["seat", "seet"]
