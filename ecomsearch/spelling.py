"""Query spelling correction against the catalog's own vocabulary.

A fifth of the Home Depot queries hold a word no product text contains ("toliet seat",
"vaccuum", "celing fan", "doorknob"), and a word no product has adds nothing to BM25. Each such
word is replaced, for lexical matching only, by the closest word the catalog does use:

1. joined with its neighbour, if the pair written as one word is in the vocabulary
   ("rubber maid" -> "rubbermaid");
2. else the vocabulary word within a small edit distance (Damerau-Levenshtein, adjacent
   transpositions counted once) that most products use; one edit for words under eight letters,
   two from eight on, where a second typo is likelier than a different word;
3. else split in two vocabulary words ("doorknob" -> "door knob");
4. else kept as typed.

Candidates within the distance come from a symmetric-delete index (SymSpell's idea): every
vocabulary word is stored under each string left by deleting up to two of its letters, so a
query word's own deletions find them without scanning the vocabulary. Only a word that no
document has is corrected, so a query that already matches is left exactly as typed; numbers,
words under four letters or over MAX_WORD_LENGTH and mixed tokens are never touched. The
vocabulary is the catalog's, so nothing here is tuned to one shop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

MIN_WORD_LENGTH = 4  # shorter words are too ambiguous to correct ("sku", "led", "hdmi" stays)
# Longer words are neither corrected nor correction targets: the deletion sets grow with the
# square of a word's length (a 320-letter query word cost 70 ms, one 2,000-letter word in a
# product's text 30 s and 4 GB when the index loaded), and no typo of a real word is that long.
MAX_WORD_LENGTH = 24
LONG_WORD_LENGTH = 8  # from this length on, two edits are allowed
MAX_EDITS = 2
# A vocabulary word used by a single product is as likely a typo in the catalog as a word.
MIN_DOCUMENT_FREQUENCY = 2
MIN_SPLIT_PART_LENGTH = 3


def deletions(word: str, edits: int) -> set[str]:
    """The word and every string left by deleting up to `edits` of its letters."""
    found = {word}
    frontier = {word}
    for _ in range(edits):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (insertions, deletions, substitutions, adjacent
    transpositions), or limit + 1 as soon as it must exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            best = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                best = min(best, previous2[j - 2] + 1)
            current[j] = best
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return min(previous[-1], limit + 1)


def allowed_edits(word: str) -> int:
    return 1 if len(word) < LONG_WORD_LENGTH else MAX_EDITS


def correctable(word: str) -> bool:
    return MIN_WORD_LENGTH <= len(word) <= MAX_WORD_LENGTH and word.isalpha()


class SpellingCorrector:
    """Corrects query tokens a catalog's documents never use; see the module docstring."""

    def __init__(self, document_frequency: Mapping[str, int]) -> None:
        """`document_frequency`: each vocabulary word and how many documents use it."""
        self.document_frequency = dict(document_frequency)
        # The deletion index as two arrays sorted by the deletion's hash (12 bytes an entry; a
        # dict of lists took 40 MB for the 17k words of 55k products, this 2.7 MB). Hashes
        # that collide only add candidates, which are checked by their distance anyway. (str's
        # hash is salted per process: the index is used only by the process that built it.)
        self._targets = [
            word
            for word, frequency in self.document_frequency.items()
            if frequency >= MIN_DOCUMENT_FREQUENCY and correctable(word)
        ]
        hashes: list[int] = []
        owners: list[int] = []
        for position, word in enumerate(self._targets):
            for deleted in deletions(word, allowed_edits(word)):
                hashes.append(hash(deleted))
                owners.append(position)
        keys = np.array(hashes, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._owners = np.array(owners, dtype=np.int32)[order]

    def _candidates(self, word: str, edits: int) -> set[str]:
        """The words stored under any string `edits` deletions from `word` leave."""
        keys = np.array([hash(d) for d in deletions(word, edits)], dtype=np.int64)
        starts = np.searchsorted(self._keys, keys, side="left")
        ends = np.searchsorted(self._keys, keys, side="right")
        return {
            self._targets[owner]
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
            for owner in self._owners[start:end].tolist()
        }

    def frequency(self, word: str) -> int:
        return self.document_frequency.get(word, 0)

    def closest(self, *spellings: str) -> str | None:
        """The most used vocabulary word within the allowed edits of any of `spellings` (a word
        as normalised, and as typed), or None; ties go to the fewer edits, then the more
        documents, then the alphabet (deterministic)."""
        best: tuple[int, int, str] | None = None
        for word in dict.fromkeys(spellings):
            limit = allowed_edits(word)
            for candidate in self._candidates(word, limit):
                # A candidate stored under a long word's two deletions may be short: it is held
                # to its own limit too, so "toiletxx" cannot become "toilet".
                reach = min(limit, allowed_edits(candidate))
                distance = edit_distance(word, candidate, reach)
                if distance <= reach:
                    key = (distance, -self.frequency(candidate), candidate)
                    best = key if best is None or key < best else best
        return None if best is None else best[2]

    def split(self, word: str) -> tuple[str, str] | None:
        """Two vocabulary words that spell `word`, the split whose rarer half is most used."""
        best: tuple[int, int] | None = None
        for at in range(MIN_SPLIT_PART_LENGTH, len(word) - MIN_SPLIT_PART_LENGTH + 1):
            support = min(self.frequency(word[:at]), self.frequency(word[at:]))
            if support >= MIN_DOCUMENT_FREQUENCY and (best is None or support > best[0]):
                best = (support, at)
        return None if best is None else (word[: best[1]], word[best[1] :])

    def correct(
        self,
        tokens: Sequence[str],
        known: Callable[[str], bool] | None = None,
        typed: Sequence[str] | None = None,
    ) -> list[str]:
        """The tokens with each correctable unknown word corrected. `known` names words that
        count as known beyond the vocabulary (a live catalog's newer products). `typed`, the
        same words before normalisation, is searched too: plural folding turns "wireles" into
        "wirele", two edits from "wireless" where the typed word is one."""
        if typed is not None and len(typed) != len(tokens):
            raise ValueError(f"{len(typed)} typed words for {len(tokens)} tokens")

        def as_typed(position: int) -> tuple[str, ...]:
            return () if typed is None else (typed[position],)

        def unknown(word: str) -> bool:
            # Even one product's word is known: a query that matches it was typed on purpose.
            return correctable(word) and not (
                self.frequency(word) > 0 or (known is not None and known(word))
            )

        corrected: list[str] = []
        position = 0
        while position < len(tokens):
            token = tokens[position]
            following = tokens[position + 1] if position + 1 < len(tokens) else None
            # A word written apart, either half unknown ("rubber maid" -> "rubbermaid").
            if (
                following is not None
                and (unknown(token) or unknown(following))
                and self.frequency(token + following) >= MIN_DOCUMENT_FREQUENCY
            ):
                corrected.append(token + following)
                position += 2
                continue
            if not unknown(token):
                corrected.append(token)
            elif (closest := self.closest(token, *as_typed(position))) is not None:
                corrected.append(closest)
            elif (halves := self.split(token)) is not None:
                corrected.extend(halves)
            else:
                corrected.append(token)
            position += 1
        return corrected


def document_frequencies(
    vocabulary: Mapping[str, int], postings_offsets: np.ndarray
) -> dict[str, int]:
    """Word -> number of documents, from a CSC-style postings layout (offsets per term id)."""
    size = len(postings_offsets) - 1
    return {
        word: int(postings_offsets[term + 1] - postings_offsets[term])
        for word, term in vocabulary.items()
        if word and 0 <= term < size
    }


__all__ = ["SpellingCorrector", "deletions", "document_frequencies", "edit_distance"]
