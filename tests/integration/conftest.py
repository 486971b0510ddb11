"""A real tritonserver over a small catalog cut from the demo catalog, shared by the session."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecomsearch.paths import ModelRepositoryLayout, demo_catalog
from ecomsearch.server.launcher import TritonServer
from ecomsearch.workspace import link_model_repository
from tests.project import MODEL_REPOSITORY

SOURCE_REPOSITORY = MODEL_REPOSITORY
# Enough of each category that a query must pick the right one out of look-alikes.
PRODUCTS_PER_CATEGORY = 40


def cut_fixture_catalog(target: Path) -> Path:
    """The first products (by source popularity) of every category of the demo catalog."""
    kept: dict[str, list[str]] = defaultdict(list)
    with gzip.open(demo_catalog(), "rt", encoding="utf-8") as stream:
        for line in stream:
            category = json.loads(line)["category_path"][-1]
            if len(kept[category]) < PRODUCTS_PER_CATEGORY:
                kept[category].append(line)
    target.write_text("".join(line for lines in kept.values() for line in lines))
    return target


def wait_ready(ops_port: int, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Waits for a server started as a command (`ecomsearch serve`) to be ready, asking its
    metrics and health port as an orchestrator's probe would."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/v2/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("server not ready in time")


def copy_model_repository(target: Path) -> Path:
    """The checked-in repository (configs, model.py, ranker) plus links to the exported encoder."""
    try:
        return link_model_repository(SOURCE_REPOSITORY, target)
    except FileNotFoundError as e:
        pytest.fail(f"{e} (`make test` exports the encoder before running the tests)")


def set_instance_count(repository: Path, model: str, count: int) -> None:
    """Rewrites `model`'s config.pbtxt (through Triton's protobuf) with `count` CPU instances."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    (group,) = config.instance_group
    group.count = count
    path.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="session")
def fixture_catalog(tmp_path_factory) -> Path:
    return cut_fixture_catalog(tmp_path_factory.mktemp("catalog") / "catalog.jsonl")


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, fixture_catalog, embedding_cache) -> Path:
    from ecomsearch.index.builder import build_index

    repository = copy_model_repository(tmp_path_factory.mktemp("models") / "repository")
    build_index(fixture_catalog, ModelRepositoryLayout(repository), cache_dir=embedding_cache)
    return repository


@pytest.fixture(scope="session")
def triton_server(model_repository, tmp_path_factory) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer.local(model_repository, log_path) as server:
        yield server


@pytest.fixture(scope="session")
def grpc_url(triton_server) -> str:
    return triton_server.grpc_url
