"""The query rule the server applies and the client applies before sending."""

from __future__ import annotations

import pytest

from ecomsearch.query import visible_text


@pytest.mark.parametrize(
    ("text", "searched"),
    [
        ("gaming  mouse", "gaming mouse"),
        ("mo\u200buse pad", "mouse pad"),  # a zero-width space inside a word joins it back
        ("gaming\x00mouse", "gaming mouse"),  # a control character separates like a space
        ("\ufeffssd\r\n", "ssd"),
        ("caf\u00e9 \u00f1and\u00fa", "caf\u00e9 \u00f1and\u00fa"),
        ("\U0001f5b1 mouse", "\U0001f5b1 mouse"),
        ("\u200b\u200c\u200d\u2060", ""),
        ("\x00\x01\x7f", ""),
        ("", ""),
    ],
)
def test_visible_text(text: str, searched: str) -> None:
    assert visible_text(text) == searched
