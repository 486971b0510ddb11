"""Model repositories of their own, for catalogs other than the one being served (eval, training,
tests): the project's configs and model.py files, links to its exported models, and an index of
that catalog, rebuilt only when the catalog or the encoder changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.atomic import index_paths, is_private_name
from ecomsearch.paths import ModelRepositoryLayout, default_model_repository


def link_model_repository(source: Path, target: Path) -> Path:
    """Makes `target` a copy of the checked-in part of `source` (whatever else it held is
    removed, its own index aside) with links to `source`'s generated encoders and tokenizer."""
    source_layout, target_layout = ModelRepositoryLayout(source), ModelRepositoryLayout(target)
    for path, command in (
        (source_layout.encoder_onnx, "export-encoder"),
        (source_layout.encoder_int8_onnx, "export-encoder"),
        (source_layout.tokenizer_dir, "export-encoder"),
        (source_layout.cross_encoder_onnx, "export-cross-encoder"),
    ):
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run `ecomsearch {command}` first")
    generated = {path.resolve() for path in source_layout.generated()}

    def skip(directory: str, names: list[str]) -> set[str]:
        # The source's index is a symlink to a versioned directory; its other versions, scratch
        # directories and lock beside it are no more the workspace's than the index itself.
        return {
            name
            for name in names
            if name == "__pycache__"
            or (Path(directory) / name).resolve() in generated
            or (
                Path(directory) == source_layout.index_dir.parent
                and is_private_name(name, source_layout.index_dir)
            )
        }

    # The workspace's own index (the symlink and its versioned directories, which move together
    # so the relative link stays valid) waits beside the workspace while it is copied afresh.
    kept = target.with_name(f".{target.name}.index-{os.getpid()}")
    shutil.rmtree(kept, ignore_errors=True)
    for path in index_paths(target_layout.index_dir):
        kept.mkdir(exist_ok=True)
        os.replace(path, kept / path.name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=skip, symlinks=False)
    if kept.exists():
        # In the latest retrieve version of the new copy, which may be another one.
        index_parent = target_layout.index_dir.parent
        index_parent.mkdir(parents=True, exist_ok=True)
        for path in kept.iterdir():
            os.replace(path, index_parent / path.name)
        kept.rmdir()
    for source_path, target_path in (
        (source_layout.encoder_onnx, target_layout.encoder_onnx),
        (source_layout.encoder_int8_onnx, target_layout.encoder_int8_onnx),
        (source_layout.tokenizer_dir, target_layout.tokenizer_dir),
        (source_layout.cross_encoder_onnx, target_layout.cross_encoder_onnx),
    ):
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target_path.symlink_to(source_path.resolve(), target_is_directory=source_path.is_dir())
    return target


def catalog_repository(
    catalog: Path, cache_dir: Path, source: Path | None = None
) -> tuple[Path, object]:
    """A served-ready model repository for `catalog` under cache_dir; returns it and the
    BuildResult of its index."""
    from ecomsearch.index.builder import build_index

    source = source or default_model_repository()
    # One workspace per (catalog, encoder): a re-exported encoder gets an index of its own.
    encoder = ModelRepositoryLayout(source).encoder_onnx
    encoder_key = file_sha256(encoder)[:12] if encoder.is_file() else "no-encoder"
    target = cache_dir / "repositories" / f"{file_sha256(catalog)[:16]}-{encoder_key}"
    link_model_repository(source, target)
    result = build_index(catalog, ModelRepositoryLayout(target), cache_dir=cache_dir)
    return target, result
