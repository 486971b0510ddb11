"""pyproject.toml ships what the Triton models import: every ecomsearch package and the server
extra's third-party modules."""

from __future__ import annotations

import re

import pytest

from tests.project import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_every_package_under_ecomsearch_is_in_the_wheel() -> None:
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(PROJECT_ROOT).parts)
        for init in (PROJECT_ROOT / "ecomsearch").rglob("__init__.py")
    }
    assert on_disk - packages == set()


def test_every_directory_of_package_data_is_declared_a_package() -> None:
    """Python can import any directory with a valid name, so setuptools warns that it "would
    ignore" one holding package data unless `packages` lists it (25 warnings on every install,
    and a future setuptools may leave the model configs out of the wheel)."""
    settings = PYPROJECT["tool"]["setuptools"]
    packages = set(settings["packages"])
    package_dir = settings["package-dir"]
    undeclared, seen = set(), set()
    for package, patterns in settings["package-data"].items():
        source = PROJECT_ROOT / package_dir.get(package, package.replace(".", "/"))
        for pattern in patterns:
            for data_file in source.glob(pattern):
                parts = data_file.parent.relative_to(source).parts
                name = ".".join((package, *parts)) if parts else package
                seen.add(name)
                if all(part.isidentifier() for part in parts) and name not in packages:
                    undeclared.add(name)
    assert undeclared == set()
    assert "ecomsearch.model_repository.query_encoder.configs" in seen  # the globs matched


def test_the_server_extra_installs_what_the_python_models_import() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "ecomsearch[python-backend]" in extras["server"]
    backend = {re.split(r"[\[<>=]", r)[0]: r for r in extras["python-backend"]}
    # scipy: the recommenders' co-purchase counts are a sparse matrix; lightgbm: select
    # explains the tree ranker's scores; threadpoolctl: each instance caps its BLAS pools.
    assert set(backend) == {
        "numpy",
        "tokenizers",
        "bm25s",
        "psycopg",
        "scipy",
        "lightgbm",
        "threadpoolctl",
    }
    assert "<2" in backend["numpy"], "the Python backend stub breaks under numpy 2"
    # ecomsearch.lexical reads bm25s's score matrices: an unbounded upgrade could change them.
    assert "<0.4" in backend["bm25s"]
    # The catalog store may be PostgreSQL; the binary wheel brings libpq with it, so the
    # server image needs no system client library.
    assert backend["psycopg"].startswith("psycopg[binary]")
