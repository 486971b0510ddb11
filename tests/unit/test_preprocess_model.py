"""model_repository/preprocess/1/model.py driven through the fake backend module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.text import SEQUENCE_LENGTH_MULTIPLE

# A tiny WordPiece vocabulary. [PAD] is deliberately not id 0, so padding with the wrong id shows.
VOCAB = [
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[PAD]",
    "red",
    "running",
    "shoe",
    "##s",
    "gaming",
    "mouse",
    "café",
    "blue",
]
ID = {token: i for i, token in enumerate(VOCAB)}
CLS, SEP, PAD, UNK = ID["[CLS]"], ID["[SEP]"], ID["[PAD]"], ID["[UNK]"]


def write_tiny_tokenizer(tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordPiece(vocab=ID, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    tokenizer_dir.mkdir(parents=True)
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture
def preprocess_dir(tmp_path: Path, triton) -> Path:
    model_dir = triton.copy_model_dir(contract.PREPROCESS_MODEL, tmp_path)
    write_tiny_tokenizer(model_dir / "1" / "tokenizer")
    return model_dir


@pytest.fixture
def preprocess(triton, preprocess_dir: Path):
    args = triton.args(preprocess_dir / "config.pbtxt", preprocess_dir)
    return triton.initialize(preprocess_dir / "1" / "model.py", args)


def queries(values: Sequence[bytes | str]) -> np.ndarray:
    """A [batch, 1] BYTES input as the backend hands it over: an object array of bytes."""
    array = np.empty((len(values), 1), dtype=object)
    array[:, 0] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    return array


def padded(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def assert_tokens(triton, response, rows: Sequence[Sequence[int]], length: int) -> None:
    out = triton.outputs(response)
    assert set(out) == {contract.INPUT_IDS, contract.ATTENTION_MASK}
    expected_ids, expected_mask = padded(rows, length)
    for name, expected in (
        (contract.INPUT_IDS, expected_ids),
        (contract.ATTENTION_MASK, expected_mask),
    ):
        # The config declares both outputs TYPE_INT64.
        assert out[name].dtype == np.int64, name
        np.testing.assert_array_equal(out[name], expected, err_msg=name)


RED_RUNNING_SHOES = [CLS, ID["red"], ID["running"], ID["shoe"], ID["##s"], SEP]
GAMING_MOUSE = [CLS, ID["gaming"], ID["mouse"], SEP]
BLUE = [CLS, ID["blue"], SEP]


def test_requests_in_one_execute_are_padded_and_returned_separately(triton, preprocess) -> None:
    long_query = " ".join(["mouse"] * 20)  # 22 tokens with [CLS] and [SEP]
    requests = [
        triton.request(query=queries(["Red running shoes", "gaming mouse"])),
        triton.request(query=queries([long_query])),
        triton.request(query=queries(["blue"])),
    ]

    responses = preprocess.execute(requests)

    assert len(responses) == 3
    assert_tokens(triton, responses[0], [RED_RUNNING_SHOES, GAMING_MOUSE], 8)
    assert_tokens(triton, responses[1], [[CLS, *[ID["mouse"]] * 20, SEP]], 24)
    assert_tokens(triton, responses[2], [BLUE], 8)


def test_whitespace_is_collapsed_and_unknown_words_map_to_unk(triton, preprocess) -> None:
    responses = preprocess.execute(
        [triton.request(query=queries(["  GAMING\t mouse \n", "Café zzzz"]))]
    )
    assert_tokens(triton, responses[0], [GAMING_MOUSE, [CLS, ID["café"], UNK, SEP]], 8)


@pytest.mark.parametrize(
    ("words", "expected_length"),
    [(1, 8), (5, 8), (6, 8), (7, 16), (14, 16), (15, 24), (62, 64)],
)
def test_padded_length_is_the_next_multiple_of_8(
    triton, preprocess, words: int, expected_length: int
) -> None:
    (response,) = preprocess.execute([triton.request(query=queries([" ".join(["blue"] * words)]))])
    input_ids = triton.outputs(response)[contract.INPUT_IDS]
    assert input_ids.shape == (1, expected_length)
    assert input_ids.shape[1] % SEQUENCE_LENGTH_MULTIPLE == 0
    assert int((input_ids != PAD).sum()) == words + 2


def test_long_queries_are_truncated_to_max_query_tokens(triton, preprocess) -> None:
    (response,) = preprocess.execute([triton.request(query=queries([" ".join(["red"] * 500)]))])
    out = triton.outputs(response)
    assert out[contract.INPUT_IDS].shape == (1, contract.MAX_QUERY_TOKENS)
    assert out[contract.ATTENTION_MASK].all()
    assert out[contract.INPUT_IDS][0, 0] == CLS
    assert out[contract.INPUT_IDS][0, -1] == SEP


def test_max_query_bytes_counts_bytes_not_characters(triton, preprocess) -> None:
    at_limit = "é" * (contract.MAX_QUERY_BYTES // 2)  # 2 bytes each in UTF-8
    over_limit = at_limit + "é"
    responses = preprocess.execute(
        [triton.request(query=queries([at_limit])), triton.request(query=queries([over_limit]))]
    )
    # One over-long word: WordPiece makes it a single [UNK].
    assert_tokens(triton, responses[0], [[CLS, UNK, SEP]], 8)
    triton.assert_invalid_arg(
        responses[1],
        f"{contract.MAX_QUERY_BYTES + 2} bytes",
        f"maximum is {contract.MAX_QUERY_BYTES}",
    )


@pytest.mark.parametrize(
    ("bad_inputs", "fragments"),
    [
        pytest.param({"query": queries([b""])}, ["query 0", "empty"], id="empty"),
        pytest.param({"query": queries([b" \t\n "])}, ["query 0", "whitespace"], id="whitespace"),
        pytest.param(
            {"query": queries(["\u200b\u200b\u200d"])}, ["query 0", "invisible"], id="zero-width"
        ),
        pytest.param({"query": queries([b"\x00\x00\x00"])}, ["query 0", "empty"], id="nul-only"),
        pytest.param(
            {"query": queries(["\ufeff \u200e\x7f"])}, ["query 0", "empty"], id="bom-bidi-del"
        ),
        pytest.param(
            {"query": queries(["gaming mouse", b"\xff\xfe shoes"])},
            ["query 1", "not valid UTF-8"],
            id="invalid-utf8-in-second-row",
        ),
        pytest.param(
            {"query": queries([b"a" * (contract.MAX_QUERY_BYTES + 1)])},
            [f"{contract.MAX_QUERY_BYTES + 1} bytes"],
            id="too-many-bytes",
        ),
        pytest.param({}, ["'query'", "required"], id="missing-input"),
        pytest.param({"query": np.array([b"gaming mouse"], dtype=object)}, ["shape"], id="not-2d"),
        pytest.param(
            {"query": np.array([[b"red", b"blue"]], dtype=object)}, ["shape"], id="two-columns"
        ),
    ],
)
def test_a_bad_request_gets_invalid_arg_and_its_neighbours_succeed(
    triton, preprocess, bad_inputs: dict[str, np.ndarray], fragments: list[str]
) -> None:
    requests = [
        triton.request(query=queries(["Red running shoes"])),
        triton.request(**bad_inputs),
        triton.request(query=queries(["gaming mouse", "blue"])),
    ]

    responses = preprocess.execute(requests)

    assert len(responses) == 3
    assert_tokens(triton, responses[0], [RED_RUNNING_SHOES], 8)
    triton.assert_invalid_arg(responses[1], *fragments)
    assert_tokens(triton, responses[2], [GAMING_MOUSE, BLUE], 8)


def test_only_bad_requests_give_only_errors(triton, preprocess) -> None:
    responses = preprocess.execute(
        [triton.request(query=queries([b""])), triton.request(query=queries([b"\xc3"]))]
    )
    triton.assert_invalid_arg(responses[0], "empty")
    triton.assert_invalid_arg(responses[1], "UTF-8")


def test_the_tokenizer_comes_from_the_served_versions_directory(triton, tmp_path: Path) -> None:
    model_dir = triton.copy_model_dir(contract.PREPROCESS_MODEL, tmp_path)
    (model_dir / "1").rename(model_dir / "3")
    write_tiny_tokenizer(model_dir / "3" / "tokenizer")
    args = triton.args(model_dir / "config.pbtxt", model_dir, version="3")

    model = triton.initialize(model_dir / "3" / "model.py", args)

    (response,) = model.execute([triton.request(query=queries(["red shoes"]))])
    assert_tokens(triton, response, [[CLS, ID["red"], ID["shoe"], ID["##s"], SEP]], 8)


def test_a_missing_tokenizer_fails_initialize(triton, tmp_path: Path) -> None:
    model_dir = triton.copy_model_dir(contract.PREPROCESS_MODEL, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        triton.initialize(
            model_dir / "1" / "model.py", triton.args(model_dir / "config.pbtxt", model_dir)
        )


def test_initialize_logs_through_the_triton_logger(triton, preprocess, preprocess_dir) -> None:
    (message,) = triton.logged("INFO")
    assert str(preprocess_dir / "1" / "tokenizer") in message


def max_tokens(value: int, rows: int = 1) -> np.ndarray:
    return np.full((rows, 1), value, dtype=np.int32)


@pytest.mark.parametrize("limit", [contract.PRODUCT_MAX_TOKENS, contract.MAX_QUERY_TOKENS, 100, 10])
def test_max_tokens_sets_where_long_text_is_cut(triton, preprocess, limit: int) -> None:
    (response,) = preprocess.execute(
        [triton.request(query=queries([" ".join(["red"] * 500)]), max_tokens=max_tokens(limit))]
    )
    assert_tokens(triton, response, [[CLS, *[ID["red"]] * (limit - 2), SEP]], limit)


def test_max_tokens_above_a_short_text_changes_nothing(triton, preprocess) -> None:
    (response,) = preprocess.execute(
        [
            triton.request(
                query=queries(["Red running shoes", "gaming mouse"]),
                max_tokens=max_tokens(contract.PRODUCT_MAX_TOKENS, rows=2),
            )
        ]
    )
    assert_tokens(triton, response, [RED_RUNNING_SHOES, GAMING_MOUSE], 8)


def test_requests_with_different_max_tokens_are_run_apart(triton, preprocess) -> None:
    long_text = " ".join(["blue"] * 200)
    responses = preprocess.execute(
        [
            triton.request(query=queries([long_text])),
            triton.request(
                query=queries([long_text, "blue"]),
                max_tokens=max_tokens(contract.PRODUCT_MAX_TOKENS, rows=2),
            ),
            triton.request(query=queries(["blue", long_text])),
            triton.request(query=queries([long_text]), max_tokens=max_tokens(20)),
        ]
    )
    query_cut = [CLS, *[ID["blue"]] * (contract.MAX_QUERY_TOKENS - 2), SEP]
    product_cut = [CLS, *[ID["blue"]] * (contract.PRODUCT_MAX_TOKENS - 2), SEP]
    assert_tokens(triton, responses[0], [query_cut], contract.MAX_QUERY_TOKENS)
    assert_tokens(triton, responses[1], [product_cut, BLUE], contract.PRODUCT_MAX_TOKENS)
    assert_tokens(triton, responses[2], [BLUE, query_cut], contract.MAX_QUERY_TOKENS)
    assert_tokens(triton, responses[3], [[CLS, *[ID["blue"]] * 18, SEP]], 20)


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        pytest.param(max_tokens(0, rows=2), ["between 2 and", "got 0"], id="zero"),
        pytest.param(max_tokens(1, rows=2), ["between 2 and", "got 1"], id="one"),
        pytest.param(
            max_tokens(contract.PRODUCT_MAX_TOKENS + 1, rows=2),
            [f"and {contract.PRODUCT_MAX_TOKENS}", f"got {contract.PRODUCT_MAX_TOKENS + 1}"],
            id="above-product-limit",
        ),
        pytest.param(max_tokens(-5, rows=2), ["got -5"], id="negative"),
        pytest.param(np.array([[64], [128]], dtype=np.int32), ["same for every query"], id="mixed"),
        pytest.param(np.array([64, 64], dtype=np.int32), ["shape [2, 1]"], id="not-2d"),
        pytest.param(max_tokens(64, rows=3), ["shape [2, 1]"], id="wrong-rows"),
    ],
)
def test_a_bad_max_tokens_gets_invalid_arg_and_its_neighbours_succeed(
    triton, preprocess, value: np.ndarray, fragments: list[str]
) -> None:
    responses = preprocess.execute(
        [
            triton.request(query=queries(["Red running shoes"]), max_tokens=max_tokens(128)),
            triton.request(query=queries(["gaming mouse", "blue"]), max_tokens=value),
            triton.request(query=queries(["gaming mouse"])),
        ]
    )
    assert_tokens(triton, responses[0], [RED_RUNNING_SHOES], 8)
    triton.assert_invalid_arg(responses[1], "'max_tokens'", *fragments)
    assert_tokens(triton, responses[2], [GAMING_MOUSE], 8)
