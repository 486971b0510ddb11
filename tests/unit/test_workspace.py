"""Workspaces: model repositories of their own for other catalogs (eval, bench, training)."""

from __future__ import annotations

import os
from pathlib import Path

from ecomsearch import contract
from ecomsearch.index.store import CatalogIndex
from ecomsearch.paths import ModelRepositoryLayout, prepare_model_repository
from ecomsearch.workspace import link_model_repository


def test_a_workspace_mirrors_its_source_and_keeps_its_own_index(tmp_path: Path) -> None:
    source = ModelRepositoryLayout(prepare_model_repository(tmp_path / "source"))
    source.encoder_onnx.write_bytes(b"encoder")
    source.encoder_int8_onnx.write_bytes(b"int8 encoder")
    source.cross_encoder_onnx.write_bytes(b"cross-encoder")
    source.tokenizer_dir.mkdir()
    (source.tokenizer_dir / "tokenizer.json").write_text("{}")
    source.index_dir.mkdir()
    (source.index_dir / "manifest.json").write_text("the source's index")

    target = tmp_path / "workspace"
    link_model_repository(source.root, target)
    workspace = ModelRepositoryLayout(target)
    assert workspace.encoder_onnx.resolve() == source.encoder_onnx.resolve()
    assert workspace.encoder_int8_onnx.resolve() == source.encoder_int8_onnx.resolve()
    assert workspace.cross_encoder_onnx.resolve() == source.cross_encoder_onnx.resolve()
    assert (workspace.tokenizer_dir / "tokenizer.json").read_text() == "{}"
    assert not workspace.index_dir.exists(), "the source's index is not the workspace's"

    workspace.index_dir.mkdir()
    (workspace.index_dir / "manifest.json").write_text("the workspace's index")
    stale = target / contract.SELECT_MODEL / "configs" / "gpu.pbtxt"
    stale.parent.mkdir()
    stale.write_text("a profile the source no longer has")
    (source.root / contract.SELECT_MODEL / "config.pbtxt").write_text("changed in the source")

    link_model_repository(source.root, target)

    assert not stale.exists()
    assert (target / contract.SELECT_MODEL / "config.pbtxt").read_text() == "changed in the source"
    assert (workspace.index_dir / "manifest.json").read_text() == "the workspace's index"
    assert workspace.encoder_onnx.is_symlink()


def test_a_workspace_keeps_its_versioned_index_across_relinks(
    tmp_path: Path, tiny_index_factory
) -> None:
    source = ModelRepositoryLayout(prepare_model_repository(tmp_path / "source"))
    source.encoder_onnx.write_bytes(b"encoder")
    source.encoder_int8_onnx.write_bytes(b"int8 encoder")
    source.cross_encoder_onnx.write_bytes(b"cross-encoder")
    source.tokenizer_dir.mkdir()
    for rows in (3, 4):  # the source's index: a symlink, its version and the previous one
        tiny_index_factory(source.index_dir, "encoder", rows=rows, dimension=8)

    target = tmp_path / "workspace"
    link_model_repository(source.root, target)
    workspace = ModelRepositoryLayout(target)
    retrieve_dir = workspace.index_dir.parent
    assert not os.path.lexists(workspace.index_dir), "the source's index is not the workspace's"
    assert [p.name for p in retrieve_dir.iterdir() if p.name.startswith(".index")] == []

    for rows in (5, 6):
        tiny_index_factory(workspace.index_dir, "encoder", rows=rows, dimension=8)
    index_and_versions = sorted(
        p.name for p in retrieve_dir.iterdir() if p.name == "index" or ".built-" in p.name
    )
    assert len(index_and_versions) == 3

    link_model_repository(source.root, target)

    assert workspace.index_dir.is_symlink()
    assert CatalogIndex.load(workspace.index_dir).count == 6
    assert sorted(p.name for p in retrieve_dir.iterdir() if p.name.startswith(".index")) == [
        name for name in index_and_versions if name != "index"
    ]
    assert not any(p.name.startswith(f".{target.name}.") for p in tmp_path.iterdir())


def test_a_source_without_its_exported_cross_encoder_is_refused(tmp_path: Path) -> None:
    import pytest

    source = ModelRepositoryLayout(prepare_model_repository(tmp_path / "source"))
    source.encoder_onnx.write_bytes(b"encoder")
    source.encoder_int8_onnx.write_bytes(b"int8 encoder")
    source.tokenizer_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="export-cross-encoder"):
        link_model_repository(source.root, tmp_path / "workspace")
