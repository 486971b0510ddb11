"""CatalogIndex.load: a good index loads and searches; a broken one refuses with a message that
names the problem."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomsearch.index.manifest import (
    DATA_FILES,
    FAISS_FILE,
    FORMAT_VERSION,
    IDS_FILE,
    KEYS_FILE,
    LEXICAL_DIR,
    MANIFEST_FILE,
    METADATA_FILE,
    IndexLoadError,
)
from ecomsearch.index.store import CatalogIndex
from ecomsearch.lexical import FIELDS, STATS_FILE

ENCODER = hashlib.sha256(b"encoder").hexdigest()
DIMENSION = 16
PRODUCTS = 10


@pytest.fixture
def tiny(tmp_path: Path, tiny_index_factory):
    return tiny_index_factory(tmp_path / "index", ENCODER, rows=PRODUCTS, dimension=DIMENSION)


@pytest.fixture
def index_dir(tiny) -> Path:
    return tiny.index_dir


def edit_manifest(index_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = index_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_data_file(index_dir: Path, name: str, data: bytes) -> None:
    """Replaces a data file and records its new checksum, as a consistent-but-wrong build would."""
    (index_dir / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(index_dir, lambda m: m["file_sha256"].__setitem__(name, digest))


def load_error(index_dir: Path, **kwargs: Any) -> str:
    with pytest.raises(IndexLoadError) as raised:
        CatalogIndex.load(index_dir, **kwargs)
    return str(raised.value)


def test_a_good_index_loads_and_finds_exact_neighbours(tiny) -> None:
    index = CatalogIndex.load(tiny.index_dir, encoder_fingerprint=ENCODER, dimension=DIMENSION)

    assert index.count == PRODUCTS
    assert index.ids.tolist() == [p.id.encode() for p in tiny.products]
    assert index.titles.tolist() == [p.title.encode() for p in tiny.products]
    assert index.metadata[1] == {"id": "sku-001", "title": "Café mug"}
    queries = tiny.embeddings[[2, 5]] + 0.01
    scores, rows = index.search(queries, 3)
    expected_rows, expected_scores = tiny.exact_top_k(queries, 3)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert scores.dtype == np.float32


def test_search_returns_at_most_every_product(tiny) -> None:
    scores, rows = CatalogIndex.load(tiny.index_dir).search(tiny.embeddings[:1], 50)
    assert rows.shape == scores.shape == (1, PRODUCTS)
    assert sorted(rows[0].tolist()) == list(range(PRODUCTS))


def test_missing_manifest(index_dir: Path) -> None:
    (index_dir / MANIFEST_FILE).unlink()
    message = load_error(index_dir)
    assert "manifest.json missing" in message and "build-index" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f'{{"format_version": {FORMAT_VERSION},', "is corrupt"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"format_version": FORMAT_VERSION, "dimension": 16}), "is corrupt"),
    ],
    ids=["truncated-json", "not-an-object", "fields-missing"],
)
def test_corrupt_manifest(index_dir: Path, text: str, fragment: str) -> None:
    (index_dir / MANIFEST_FILE).write_text(text)
    message = load_error(index_dir)
    assert MANIFEST_FILE in message and fragment in message


def test_manifest_with_an_unknown_field(index_dir: Path) -> None:
    edit_manifest(index_dir, lambda m: m.__setitem__("shards", 4))
    assert "shards" in load_error(index_dir)


@pytest.mark.parametrize(
    "version", [FORMAT_VERSION - 1, FORMAT_VERSION + 1, str(FORMAT_VERSION), None, True]
)
def test_wrong_format_version(index_dir: Path, version: int | None) -> None:
    edit_manifest(index_dir, lambda m: m.__setitem__("format_version", version))
    message = load_error(index_dir)
    assert f"format_version {version!r}" in message and "rebuild" in message


def test_encoder_fingerprint_mismatch(index_dir: Path) -> None:
    served = hashlib.sha256(b"another encoder").hexdigest()
    message = load_error(index_dir, encoder_fingerprint=served)
    assert ENCODER[:12] in message and served[:12] in message and "build-index" in message


def test_dimension_mismatch_with_the_encoder(index_dir: Path) -> None:
    message = load_error(index_dir, dimension=384)
    assert f"dimension {DIMENSION}" in message and "produces 384" in message


def test_dimension_mismatch_between_manifest_and_faiss(index_dir: Path) -> None:
    edit_manifest(index_dir, lambda m: m.__setitem__("dimension", 32))
    message = load_error(index_dir)
    assert FAISS_FILE in message and f"dimension {DIMENSION}" in message and "says 32" in message


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_data_file_missing(index_dir: Path, name: str) -> None:
    (index_dir / name).unlink()
    assert f"incomplete: {name} missing" in load_error(index_dir)


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_truncated_data_file_fails_its_checksum(index_dir: Path, name: str) -> None:
    path = index_dir / name
    path.write_bytes(path.read_bytes()[:-7])
    message = load_error(index_dir)
    assert str(path) in message and "checksum differs" in message


def lexical_files(index_dir: Path) -> list[str]:
    """The BM25 files of an index, relative to it, as the manifest names them."""
    return sorted(
        str(path.relative_to(index_dir))
        for path in (index_dir / LEXICAL_DIR).rglob("*")
        if path.is_file()
    )


def test_the_manifest_checksums_every_file_including_the_lexical_fields(
    index_dir: Path, tiny
) -> None:
    names = lexical_files(index_dir)
    # One directory of files per BM25 field, and the statistics bm25s does not save.
    assert {Path(name).parts[1] for name in names} == {*FIELDS, STATS_FILE}
    assert f"{LEXICAL_DIR}/{STATS_FILE}" in names
    every_file = {
        str(path.relative_to(index_dir)) for path in index_dir.rglob("*") if path.is_file()
    }
    assert set(tiny.manifest.file_sha256) == every_file - {MANIFEST_FILE}
    assert {*DATA_FILES, *names} <= every_file
    for name, digest in tiny.manifest.file_sha256.items():
        assert hashlib.sha256((index_dir / name).read_bytes()).hexdigest() == digest, name


def test_a_lexical_file_missing(index_dir: Path) -> None:
    for name in lexical_files(index_dir):
        (index_dir / name).rename(index_dir / "spare")
        assert f"incomplete: {name} missing" in load_error(index_dir), name
        (index_dir / "spare").rename(index_dir / name)
    CatalogIndex.load(index_dir)  # all back: loads again


def test_a_lexical_file_missing_is_found_even_without_vectors(index_dir: Path) -> None:
    (name, *_) = lexical_files(index_dir)
    (index_dir / name).unlink()
    assert f"incomplete: {name} missing" in load_error(index_dir, load_vectors=False)


def test_a_truncated_lexical_file_fails_its_checksum(index_dir: Path) -> None:
    path = index_dir / next(n for n in lexical_files(index_dir) if n.endswith(".npy"))
    path.write_bytes(path.read_bytes()[:-7])
    message = load_error(index_dir)
    assert str(path) in message and "checksum differs" in message


def test_lexical_fields_load_row_aligned_with_the_vectors(tiny) -> None:
    index = CatalogIndex.load(tiny.index_dir)
    lexical = index.load_lexical()

    assert lexical.count == index.count == PRODUCTS
    # "drill" is in these titles only (rows are FAISS rows).
    drill = lexical.scores(lexical.terms("drill"), "title")
    expected = [i for i, p in enumerate(tiny.products) if "drill" in p.title.lower().split()]
    assert expected and np.flatnonzero(drill).tolist() == expected


def test_corrupt_lexical_fields_without_checksums_raise_index_load_error(index_dir: Path) -> None:
    name = next(n for n in lexical_files(index_dir) if n.endswith(".json"))
    (index_dir / name).write_text("{")
    index = CatalogIndex.load(index_dir, verify_checksums=False)
    with pytest.raises(IndexLoadError, match=LEXICAL_DIR):
        index.load_lexical()


def test_a_flipped_byte_in_the_faiss_file_fails_its_checksum(index_dir: Path) -> None:
    path = index_dir / FAISS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum differs" in load_error(index_dir)


def test_a_truncated_faiss_file_is_refused_even_without_checksums(index_dir: Path) -> None:
    path = index_dir / FAISS_FILE
    path.write_bytes(path.read_bytes()[:40])
    message = load_error(index_dir, verify_checksums=False)
    assert str(path) in message and "is corrupt" in message


def test_unparseable_ids_with_a_matching_checksum(index_dir: Path) -> None:
    rewrite_data_file(index_dir, IDS_FILE, b'["sku-000", ')
    assert "is corrupt" in load_error(index_dir)


def test_metadata_with_a_product_missing(index_dir: Path) -> None:
    lines = (index_dir / METADATA_FILE).read_bytes().splitlines(keepends=True)
    rewrite_data_file(index_dir, METADATA_FILE, b"".join(lines[:-1]))
    message = load_error(index_dir)
    assert "inconsistent" in message
    assert f"'{METADATA_FILE}': {PRODUCTS - 1}" in message and f"'manifest': {PRODUCTS}" in message


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_store_keys_load_as_written(tmp_path: Path, tiny) -> None:
    from ecomsearch.index.builder import CatalogSnapshot, write_index

    keys = 100 + 3 * np.arange(PRODUCTS)[::-1]  # neither the rows nor ascending
    snapshot = CatalogSnapshot(tiny.products, keys, tiny.embeddings, ENCODER, "catalog")
    write_index(tmp_path / "keyed", snapshot)

    index = CatalogIndex.load(tmp_path / "keyed")
    assert index.keys.dtype == np.int64 and index.keys.tolist() == keys.tolist()
    assert CatalogIndex.load(tiny.index_dir).keys.tolist() == list(range(PRODUCTS))


@pytest.mark.parametrize(
    "keys",
    [
        np.array([*range(PRODUCTS - 1), 0], dtype=np.int64),  # one key twice
        np.arange(PRODUCTS, dtype=np.float64),
        np.arange(PRODUCTS, dtype=np.int64).reshape(2, -1),
    ],
    ids=["duplicate", "float", "two-dimensional"],
)
def test_keys_that_are_not_distinct_int64_are_refused(index_dir: Path, keys: np.ndarray) -> None:
    rewrite_data_file(index_dir, KEYS_FILE, npy_bytes(keys))
    message = load_error(index_dir)
    assert str(index_dir / KEYS_FILE) in message and "distinct int64" in message


def test_keys_for_another_number_of_products(index_dir: Path) -> None:
    rewrite_data_file(index_dir, KEYS_FILE, npy_bytes(np.arange(PRODUCTS + 1, dtype=np.int64)))
    message = load_error(index_dir)
    assert "inconsistent" in message and f"'{KEYS_FILE}': {PRODUCTS + 1}" in message


def test_unreadable_keys_with_a_matching_checksum(index_dir: Path) -> None:
    rewrite_data_file(index_dir, KEYS_FILE, b"not an npy file")
    message = load_error(index_dir)
    assert str(index_dir / KEYS_FILE) in message and "is corrupt" in message


def test_manifest_count_disagreeing_with_the_files(index_dir: Path) -> None:
    edit_manifest(index_dir, lambda m: m.__setitem__("count", PRODUCTS + 1))
    message = load_error(index_dir)
    assert "inconsistent" in message and f"'manifest': {PRODUCTS + 1}" in message


def test_hnsw_search_depth_comes_from_the_manifest(tmp_path: Path, tiny) -> None:
    from ecomsearch.index.builder import HNSW_EF_SEARCH, CatalogSnapshot, write_index

    snapshot = CatalogSnapshot(
        tiny.products, np.arange(PRODUCTS), tiny.embeddings, ENCODER, "catalog"
    )
    written = write_index(tmp_path / "hnsw", snapshot, exact_max_products=0)
    assert written.index_type == "hnsw" and written.index_params["ef_search"] == HNSW_EF_SEARCH
    # The FAISS file keeps the depth it was built with; the manifest's wins.
    edit_manifest(tmp_path / "hnsw", lambda m: m["index_params"].__setitem__("ef_search", 77))

    index = CatalogIndex.load(tmp_path / "hnsw")

    assert index.faiss_index.hnsw.efSearch == 77
    _, rows = index.search(tiny.embeddings[[4]], 1)
    assert rows.tolist() == [[4]]
