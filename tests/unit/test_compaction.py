"""Compaction (ecomsearch.live.compaction) with a real SQLite catalog store: the index rebuilt
from the store is the live catalog the old base and its delta served, and one process at a
time compacts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ecomsearch.index.builder import store_snapshot, write_index
from ecomsearch.index.store import CatalogIndex
from ecomsearch.live.catalog import LiveCatalog
from ecomsearch.live.compaction import compact, compaction_lock
from ecomsearch.live.filters import NO_FILTER, SearchFilter
from ecomsearch.store import ProductWrite, open_store
from tests.project import PROJECT_ROOT

DIMENSION = 8
ENCODER = "encoder-fingerprint"


def vectors(count: int, seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed).normal(size=(count, DIMENSION))
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def writes(ids: list[str], tag: str = "") -> list[ProductWrite]:
    return [
        ProductWrite(
            id=product_id,
            title=f"Cordless drill {product_id} {tag}".strip(),
            brand=["Acme", "Bosch"][n % 2],
            category_path=("Tools", ["Drills", "Saws"][n % 3 == 0]),
            price=None if n % 4 == 0 else 2.5 * n,
            in_stock=n % 5 != 0,
        )
        for n, product_id in enumerate(ids)
    ]


@pytest.fixture
def store(tmp_path: Path):
    with open_store(tmp_path / "catalog.sqlite3") as store:
        yield store


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "retrieve" / "1" / "index"


def live_state(catalog: LiveCatalog) -> dict[int, tuple[bytes, np.ndarray]]:
    """Every live product of a catalog by store key: its id and vector."""
    rows = np.flatnonzero(catalog.alive)
    keys, ids = catalog.keys_of(rows), catalog.product_ids(rows)
    return dict(
        zip(keys.tolist(), zip(ids.tolist(), catalog.vectors(rows), strict=True), strict=True)
    )


def test_a_compacted_index_is_the_live_catalog_it_replaces(store, index_dir: Path) -> None:
    ids = [f"sku-{n}" for n in range(20)]
    store.upsert(writes(ids), vectors(20, seed=1), ENCODER)
    write_index(index_dir, store_snapshot(store, "catalog"))
    old_version = index_dir.resolve()
    served = LiveCatalog.load(CatalogIndex.load(index_dir))
    assert served.applied_seq == store.head() == 20

    store.upsert(writes([*ids[:3], "new-1", "new-2"], tag="v2"), vectors(5, seed=2), ENCODER)
    store.delete(ids[5:8])
    store.upsert(writes([ids[6]], tag="back"), vectors(1, seed=3), ENCODER)  # re-inserted
    served.apply(store.changes(served.applied_seq))
    assert served.delta_rows == 6 and served.live_count == 20

    manifest = compact(index_dir, store.url, exact_max_products=50_000)

    assert manifest.catalog_seq == store.head() and manifest.count == 20
    assert manifest.catalog_store_id == store.store_id
    assert index_dir.resolve() != old_version, "a new version, switched in"
    compacted = LiveCatalog.load(CatalogIndex.load(index_dir))
    assert compacted.delta_rows == 0 and compacted.applied_seq == store.head()
    assert compacted.apply(store.changes(compacted.applied_seq)) == 0, "nothing left to apply"

    before, after = live_state(served), live_state(compacted)
    assert sorted(after) == sorted(before)
    for key, (product_id, vector) in before.items():
        assert after[key][0] == product_id
        np.testing.assert_array_equal(after[key][1], vector)
    queries = vectors(4, seed=4)
    for search_filter in (
        NO_FILTER,
        SearchFilter.parse(brand="acme"),
        SearchFilter.parse(category="tools > drills", in_stock_only=True),
        SearchFilter.parse(min_price=5, max_price=30),
    ):
        old_scores, old_rows = served.search(queries, 7, served.allowed(search_filter))
        new_scores, new_rows = compacted.search(queries, 7, compacted.allowed(search_filter))
        np.testing.assert_allclose(new_scores, old_scores, atol=1e-6)
        old_keys, new_keys = served.keys_of(old_rows), compacted.keys_of(new_rows)
        assert [set(k) for k in new_keys.tolist()] == [set(k) for k in old_keys.tolist()]


def test_compaction_refuses_another_store(store, index_dir: Path, tmp_path: Path) -> None:
    store.upsert(writes(["a", "b"]), vectors(2, seed=1), ENCODER)
    write_index(index_dir, store_snapshot(store, "catalog"))
    with open_store(tmp_path / "other.sqlite3") as other:
        other.upsert(writes(["c"]), vectors(1, seed=2), ENCODER)
        with pytest.raises(RuntimeError, match="another catalog store"):
            compact(index_dir, other.url)
    assert CatalogIndex.load(index_dir).count == 2, "the served index is left alone"


def test_the_lock_is_held_by_one_holder_at_a_time(index_dir: Path) -> None:
    with compaction_lock(index_dir) as first:
        assert first is True
        # flock belongs to an open file description: a second one is another holder, as in
        # another process.
        with compaction_lock(index_dir, wait=False) as second:
            assert second is False
    with compaction_lock(index_dir, wait=False) as again:
        assert again is True, "released when its holder leaves"


TRY_LOCK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from ecomsearch.live.compaction import compaction_lock

    with compaction_lock(Path(sys.argv[1]), wait=False) as locked:
        print(locked)
    """
)


def try_lock_in_another_process(index_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(index_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_another_process_does_not_get_the_lock_while_it_is_held(index_dir: Path) -> None:
    with compaction_lock(index_dir) as held:
        assert held
        assert try_lock_in_another_process(index_dir) == "False"
    assert try_lock_in_another_process(index_dir) == "True"
