"""Loading a catalog file into a real SQLite catalog store (ecomsearch.index.builder
.load_catalog_into_store), in particular after the encoder changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.index.builder import EmbeddingCache, load_catalog_into_store
from ecomsearch.store import open_store

DIMENSION = 4


class FakeEncoder:
    """Embeds a text as a vector derived from it and the encoder's name."""

    dimension = DIMENSION

    def __init__(self, name: str) -> None:
        self.fingerprint = hashlib.sha256(name.encode()).hexdigest()

    def encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        return np.stack([self.vector(text) for text in texts]).astype(np.float32)

    def vector(self, text: str) -> np.ndarray:
        seed = int(hashlib.sha256(f"{self.fingerprint}/{text}".encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).normal(size=DIMENSION).astype(np.float32)


def write_catalog(path: Path, titles: list[str]) -> Path:
    records = [{"id": f"sku-{n}", "title": title} for n, title in enumerate(titles)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def store(tmp_path: Path):
    with open_store(tmp_path / "catalog.sqlite3") as store:
        yield store


@pytest.fixture
def cache(tmp_path: Path) -> EmbeddingCache:
    return EmbeddingCache(tmp_path / "cache")


def stored_vectors(store) -> dict[str, np.ndarray]:
    _, records = store.snapshot(with_embeddings=True)
    return {record.id: record.embedding for record in records}


def test_a_new_encoder_re_embeds_the_stored_products(store, cache, tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.jsonl", ["Cordless drill", "Claw hammer"])
    old, new = FakeEncoder("old"), FakeEncoder("new")
    assert load_catalog_into_store(store, catalog, old, cache)
    before = stored_vectors(store)
    head = store.head()

    assert load_catalog_into_store(store, catalog, new, cache)

    assert store.encoder_fingerprint == new.fingerprint
    after = stored_vectors(store)
    assert sorted(after) == ["sku-0", "sku-1"]
    assert not any(np.array_equal(after[i], before[i]) for i in after)
    assert store.head() == head, "re-embedding changes no product: no new changes"
    assert not load_catalog_into_store(store, catalog, new, cache), "the same file again"


def test_a_store_whose_products_were_all_deleted_takes_a_new_encoder(
    store, cache, tmp_path: Path
) -> None:
    first = write_catalog(tmp_path / "first.jsonl", ["Cordless drill"])
    load_catalog_into_store(store, first, FakeEncoder("old"), cache)
    store.delete(["sku-0"])
    assert store.count() == 0

    second = write_catalog(tmp_path / "second.jsonl", ["Garden hose", "Paint roller"])
    new = FakeEncoder("new")
    assert load_catalog_into_store(store, second, new, cache)

    assert store.encoder_fingerprint == new.fingerprint and store.count() == 2
    np.testing.assert_array_equal(stored_vectors(store)["sku-1"], new.vector("Paint roller"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_loading_one_file_together_load_it_once(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Each pod's init step loads the catalog file; started together, exactly one loads it and
    the others find it loaded (without the store's lock, each upserted every product)."""
    import threading

    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").create_database()
    else:
        url = str(tmp_path / "shared.sqlite3")
    titles = [f"Product {n}" for n in range(300)]
    catalog = write_catalog(tmp_path / "catalog.jsonl", titles)
    encoder = FakeEncoder("encoder")
    # A step that fails breaks the barrier, so the others stop waiting and the failure is
    # reported below rather than as three missing results a minute later.
    start = threading.Barrier(3, timeout=30)
    loaded: list[bool] = []
    errors: list[BaseException] = []

    def init_step(n: int) -> None:
        try:
            with open_store(url) as store:
                start.wait()
                loaded.append(
                    load_catalog_into_store(
                        store, catalog, encoder, EmbeddingCache(tmp_path / f"cache-{n}")
                    )
                )
        except BaseException as e:  # reported by the assertion below
            start.abort()
            errors.append(e)

    steps = [threading.Thread(target=init_step, args=(n,)) for n in range(3)]
    for step in steps:
        step.start()
    for step in steps:
        step.join(60)

    assert not errors, f"{errors[0]!r}"  # the first is the cause; the rest see a broken barrier
    assert sorted(loaded) == [False, False, True]
    with open_store(url) as store:
        assert store.count() == len(titles)
        assert store.head() == len(titles), "every product was written once"
