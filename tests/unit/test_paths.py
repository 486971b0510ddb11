"""ModelRepositoryLayout, the one description of where artefacts live, and the package's own
files and default locations."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ecomsearch import contract, paths
from ecomsearch.paths import ModelRepositoryLayout, prepare_model_repository
from tests.project import MODEL_REPOSITORY, PROJECT_ROOT


def test_artefacts_are_read_from_the_latest_version_of_each_model(tmp_path: Path) -> None:
    layout = ModelRepositoryLayout(tmp_path)
    for model, versions in (
        (contract.ENCODER_MODEL, ["1", "2", "10"]),
        (contract.RETRIEVE_MODEL, ["3"]),
        (contract.RANKER_MODEL, ["1", "0", "latest"]),  # not versions, as Triton sees it
    ):
        for version in versions:
            (tmp_path / model / version).mkdir(parents=True)
    (tmp_path / contract.ENCODER_MODEL / "11").write_text("a file, not a version")

    assert layout.encoder_onnx == tmp_path / contract.ENCODER_MODEL / "10" / "model.onnx"
    assert layout.index_dir == tmp_path / contract.RETRIEVE_MODEL / "3" / "index"
    assert layout.ranker_info == tmp_path / contract.RANKER_MODEL / "1" / "ranker.json"
    # A model with no version yet gets the first one, where a writer creates it.
    assert layout.tokenizer_dir == tmp_path / contract.PREPROCESS_MODEL / "1" / "tokenizer"
    assert layout.version_dir(contract.ENCODER_MODEL, 2) == tmp_path / "query_encoder" / "2"


def test_a_triton_models_args_give_its_repository_and_served_version(tmp_path: Path) -> None:
    args = {"model_repository": str(tmp_path / "retrieve"), "model_version": "4"}
    layout, version_dir = ModelRepositoryLayout.of_triton_model(args)
    assert layout.root == tmp_path
    assert version_dir == tmp_path / "retrieve" / "4"


def test_the_checked_in_repository_is_what_the_layout_describes() -> None:
    layout = ModelRepositoryLayout(MODEL_REPOSITORY)
    assert layout.ranker_onnx.is_file() and layout.ranker_info.is_file()
    assert layout.ranker_card.is_file()
    assert layout.recommend_ranker_onnx.is_file() and layout.recommender_info.is_file()
    assert layout.recommend_ranker_card.is_file()
    # Generated artefacts are never committed, in whichever version they are written (a file
    # inside a generated directory stands for the directory, which may not exist yet; the
    # index is a symlink once built, which git will not look beyond, so it stands for itself).
    layout = ModelRepositoryLayout(MODEL_REPOSITORY)
    for version in ("1", "2"):
        for path in layout.generated():
            if path == layout.tokenizer_dir:
                path = path / "manifest.json"
            relative = str(path.relative_to(MODEL_REPOSITORY)).replace("/1/", f"/{version}/")
            candidate = MODEL_REPOSITORY / relative
            ignored = subprocess.run(
                ["git", "check-ignore", "--no-index", "-q", str(candidate)], cwd=PROJECT_ROOT
            )
            assert ignored.returncode == 0, f"{candidate} is not git-ignored"


def test_from_a_checkout_the_defaults_are_the_checkouts(monkeypatch) -> None:
    monkeypatch.delenv(paths.MODEL_REPOSITORY_ENV, raising=False)
    monkeypatch.delenv(paths.CACHE_DIR_ENV, raising=False)
    assert paths.source_checkout() == PROJECT_ROOT
    assert paths.default_model_repository() == MODEL_REPOSITORY
    assert paths.default_cache_dir() == PROJECT_ROOT / ".cache"
    assert paths.template_repository() == MODEL_REPOSITORY
    assert paths.demo_catalog().is_file() and paths.demo_catalog(full=True).is_file()
    assert paths.default_queries().is_file()


def test_installed_the_defaults_are_per_user(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "source_checkout", lambda: None)
    monkeypatch.delenv(paths.MODEL_REPOSITORY_ENV, raising=False)
    monkeypatch.delenv(paths.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.default_cache_dir() == tmp_path / "xdg" / "ecomsearch"
    assert paths.default_model_repository() == tmp_path / "xdg" / "ecomsearch" / "model_repository"
    monkeypatch.setenv(paths.MODEL_REPOSITORY_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert paths.default_model_repository() == tmp_path / "elsewhere"
    assert paths.default_cache_dir() == tmp_path / "cache"


def test_prepare_copies_the_template_and_keeps_generated_files(tmp_path: Path) -> None:
    target = tmp_path / "repository"
    prepare_model_repository(target)
    layout = ModelRepositoryLayout(target)
    template = ModelRepositoryLayout(MODEL_REPOSITORY)
    assert layout.ranker_onnx.read_bytes() == template.ranker_onnx.read_bytes()
    for name in (contract.SEARCH_MODEL, contract.RETRIEVE_MODEL, contract.SELECT_MODEL):
        assert (target / name / "config.pbtxt").is_file()
    assert not layout.encoder_onnx.exists() and not layout.index_dir.exists()

    layout.encoder_onnx.write_bytes(b"exported here")
    config = target / contract.SELECT_MODEL / "config.pbtxt"
    config.write_text("edited by hand")
    prepare_model_repository(target)  # the template did not change: nothing is touched
    assert config.read_text() == "edited by hand"

    (target / paths.TEMPLATE_STAMP).write_text("an older release\n")
    prepare_model_repository(target)  # the template changed: its files are installed again
    assert config.read_text() == (MODEL_REPOSITORY / "select" / "config.pbtxt").read_text()
    assert layout.encoder_onnx.read_bytes() == b"exported here"


def test_prepare_leaves_the_template_and_other_repositories_alone(tmp_path: Path) -> None:
    assert prepare_model_repository(MODEL_REPOSITORY) == MODEL_REPOSITORY
    assert not (MODEL_REPOSITORY / paths.TEMPLATE_STAMP).exists()
    # Someone's own repository (say, copied out of the container image): never overwritten.
    theirs = tmp_path / "served-models"
    (theirs / contract.SELECT_MODEL).mkdir(parents=True)
    (theirs / contract.SELECT_MODEL / "config.pbtxt").write_text("their own")
    prepare_model_repository(theirs)
    assert (theirs / contract.SELECT_MODEL / "config.pbtxt").read_text() == "their own"
    assert sorted(p.name for p in theirs.iterdir()) == [contract.SELECT_MODEL]


def test_make_clean_removes_the_index_symlink_its_versions_and_scratch(
    tmp_path: Path, tiny_index_factory
) -> None:
    """`make clean` runs `git clean -fdX -- model_repository`: every index file must be ignored,
    the `index` symlink included (a pattern `index/` would match only a directory)."""
    (tmp_path / ".gitignore").write_bytes((PROJECT_ROOT / ".gitignore").read_bytes())
    layout = ModelRepositoryLayout(tmp_path / "model_repository")
    layout.index_dir.parent.mkdir(parents=True)
    (layout.index_dir.parent / "model.py").write_text("checked in")
    for rows in (3, 4):
        tiny_index_factory(layout.index_dir, "encoder", rows=rows, dimension=8)
    (layout.index_dir.parent / f".index.building-20240101T000000000000Z-{os.getpid()}").mkdir()
    assert layout.index_dir.is_symlink() and len(list(layout.index_dir.parent.iterdir())) == 6

    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "clean", "-fdXq", "--", "model_repository"], cwd=tmp_path, check=True)

    assert [p.name for p in layout.index_dir.parent.iterdir()] == ["model.py"]
