"""`pip install .` (not editable) into a fresh virtual environment, then the commands a user
runs, from a directory that is not the project: everything the package needs ships inside it,
and everything it generates goes to the per-user cache directory, never into site-packages.

The fresh environment gets the project's dependencies from this one through a .pth line (pip
would otherwise download or copy gigabytes). Python does not read .pth files found in such a
directory, so this environment's editable install of ecomsearch stays invisible there."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from ecomsearch.paths import demo_catalog
from ecomsearch.server.launcher import ServerPorts
from tests.project import PROJECT_ROOT

from .conftest import wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "results", "build", "*.egg-info", "__pycache__", ".*_cache"
)
PRODUCTS = 120


@dataclass(frozen=True)
class Installation:
    venv: Path
    site_packages: Path
    home: Path
    workdir: Path
    env: dict[str, str]

    @property
    def user_cache(self) -> Path:
        return self.home / "xdg-cache" / "ecomsearch"

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        completed = subprocess.run(
            [str(self.venv / "bin" / "ecomsearch"), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed

    def python(self, code: str) -> str:
        completed = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return completed.stdout.strip()


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installation:
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    shutil.copytree(PROJECT_ROOT, source, ignore=SOURCE_IGNORED, symlinks=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = venv / "lib" / version / "site-packages"
    (site_packages / "_project_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    home = root / "home"
    workdir = root / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECOMSEARCH_", "PYTHON"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / "xdg-cache"),
        PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]),
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1",
    )
    # The build backend (setuptools) comes from the dependencies, so no download is needed.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip, "--no-build-isolation", str(source)],
        cwd=workdir,
        env=env,
        check=True,
        timeout=300,
    )
    shutil.rmtree(source)  # nothing may depend on the source tree any more
    return Installation(venv, site_packages, home, workdir, env)


def small_catalog(path: Path) -> Path:
    with gzip.open(demo_catalog(), "rt", encoding="utf-8") as stream:
        lines = [line for _, line in zip(range(PRODUCTS), stream, strict=False)]
    path.write_text("".join(lines))
    return path


def test_the_installed_package_runs_from_anywhere(installed: Installation) -> None:
    site_before = snapshot(installed.site_packages)
    where = json.loads(
        installed.python(
            "import json, ecomsearch, ecomsearch.paths as p\n"
            "print(json.dumps([ecomsearch.__file__, str(p.source_checkout()),"
            " str(p.default_model_repository()), str(p.demo_catalog()), str(p.default_queries()),"
            " str(p.default_cache_dir())]))"
        )
    )
    package, checkout, repository, catalog, queries, cache = map(Path, where)
    assert package.is_relative_to(installed.site_packages)
    assert str(checkout) == "None"
    assert repository == installed.user_cache / "model_repository"
    assert cache == installed.user_cache
    assert catalog.is_file() and catalog.is_relative_to(installed.site_packages)
    assert queries.is_file() and queries.is_relative_to(installed.site_packages)
    assert installed.run("--version").stdout.strip().startswith("ecomsearch ")

    installed.run("export-encoder")
    installed.run("export-cross-encoder")
    catalog_file = small_catalog(installed.workdir / "catalog.jsonl")
    installed.run("build-index", "--catalog", str(catalog_file))
    assert (repository / "query_encoder").is_dir() and (repository / "ranker").is_dir()

    ports = ServerPorts.free()
    serve = [
        *(str(installed.venv / "bin" / "ecomsearch"), "serve", "--address", "127.0.0.1"),
        *(f"--http-port={ports.http}", f"--grpc-port={ports.grpc}"),
        f"--metrics-port={ports.metrics}",
    ]
    server = subprocess.Popen(
        serve,
        cwd=installed.workdir,
        env=installed.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(ports.metrics, server)
        hits = json.loads(
            installed.run(
                "search", "wireless gaming mouse", "-k", "3", "--json",
                "--url", f"127.0.0.1:{ports.grpc}",
            ).stdout
        )  # fmt: skip
        assert len(hits) == 3 and all(hit["product_id"] for hit in hits)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 0

    installed.run(
        "bench", "--catalog", str(catalog_file), "--systems", "triton", "in_process",
        "--concurrency", "1", "--max-requests", "5", "--max-seconds", "5", "--out", "bench",
    )  # fmt: skip
    report = json.loads((installed.workdir / "bench" / "bench.json").read_text())
    assert {run["system"] for run in report["runs"]} == {"triton", "in_process"}
    assert all(run["errors"] == 0 for run in report["runs"])

    judgments = installed.workdir / "judgments.csv"
    ids = [json.loads(line)["id"] for line in catalog_file.read_text().splitlines()[:4]]
    judgments.write_text(
        "query,product_id,relevance\n"
        + "".join(f"gaming mouse,{pid},{3 if n % 2 else 1}\n" for n, pid in enumerate(ids))
    )
    installed.run("eval", "--catalog", str(catalog_file), "--judgments", str(judgments))
    assert json.loads((installed.workdir / "results" / "eval" / "eval.json").read_text())

    assert snapshot(installed.site_packages) == site_before, "something was written there"
    assert not (installed.workdir / ".cache").exists()
    generated = {p.name for p in installed.user_cache.rglob("*")}
    assert {"model.onnx", "tokenizer.json", "manifest.json", "embeddings"} <= generated
