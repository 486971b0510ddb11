"""pyproject.toml ships what the Triton models import: every ecomsearch package and the server
extra's third-party modules."""

from __future__ import annotations

import pytest

from ecomsearch.paths import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_every_package_under_ecomsearch_is_in_the_wheel() -> None:
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(PROJECT_ROOT).parts)
        for init in (PROJECT_ROOT / "ecomsearch").rglob("__init__.py")
    }
    assert on_disk - packages == set()


def test_the_server_extra_installs_bm25s() -> None:
    server = PYPROJECT["project"]["optional-dependencies"]["server"]
    assert any(requirement.startswith("bm25s") for requirement in server)
