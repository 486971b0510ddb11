"""Shared test helpers: the fake Python-backend module, loading model.py files, the `args`
tritonserver passes to initialize, tiny index directories, tiny model repositories and a real
PostgreSQL server.

Test modules reach these through fixtures (`pb_utils`, `triton`, `tiny_index_factory`,
`tiny_repository_factory`, `postgres_server`) rather than by importing conftest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.catalog import Product
from ecomsearch.index.manifest import IndexManifest
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.features import FEATURE_NAMES
from tests.postgres import PostgresNotInstalledError, PostgresServer
from tests.project import MODEL_REPOSITORY

FAKE_PB_UTILS = Path(__file__).resolve().parent / "fakes" / "triton_python_backend_utils.py"

PB_UTILS_MODULE = "triton_python_backend_utils"
_loaded_models = count()


def _fresh_fake_pb_utils() -> ModuleType:
    spec = importlib.util.spec_from_file_location(PB_UTILS_MODULE, FAKE_PB_UTILS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh fake `triton_python_backend_utils`, importable by that name for this test only."""
    module = _fresh_fake_pb_utils()
    monkeypatch.setitem(sys.modules, PB_UTILS_MODULE, module)
    return module


def load_triton_model(path: Path | str) -> ModuleType:
    """Imports a model.py by path, as the Python backend stub does. Needs the `pb_utils` fixture
    (the model imports triton_python_backend_utils at import time)."""
    if PB_UTILS_MODULE not in sys.modules:
        raise RuntimeError("use the pb_utils fixture before loading a model.py")
    path = Path(path)
    name = f"_triton_model_{path.parent.parent.name}_{next(_loaded_models)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# int64/uint64 fields are strings in protobuf's JSON; tritonserver turns them back into numbers
# before handing the config to a backend (ModelConfigToJson in triton core).
_INT64_LISTS = ("dims",)
_INT64_SCALARS = (
    "max_queue_delay_microseconds",
    "default_timeout_microseconds",
    "priority_levels",
    "default_priority_level",
)


def _fix_int64(node: Any) -> Any:
    if isinstance(node, dict):
        fixed = {}
        for key, value in node.items():
            if key in _INT64_LISTS or key == "shape":
                fixed[key] = [int(v) for v in value]
            elif key in _INT64_SCALARS and isinstance(value, str):
                fixed[key] = int(value)
            else:
                fixed[key] = _fix_int64(value)
        return fixed
    if isinstance(node, list):
        return [_fix_int64(item) for item in node]
    return node


def model_config_json(config_path: Path | str) -> str:
    """A config.pbtxt as tritonserver serialises it for the Python backend: protobuf JSON with
    proto field names, defaults printed, enums by name ("TYPE_FP32"), `parameters` as
    {key: {"string_value": ...}}, int64 fields as numbers, instance groups named."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())
    for position, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{position}"
    raw = json_format.MessageToJson(
        config,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return json.dumps(_fix_int64(json.loads(raw)))


def set_parameters(config_path: Path | str, **values: str | int) -> None:
    """Rewrites a config.pbtxt in place with these `parameters` set (through the protobuf, so
    the result is a config tritonserver would parse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(config_path)
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    path.write_text(text_format.MessageToString(config))


def config_parameter(config_path: Path | str, key: str, default: str) -> str:
    """One `parameters` value of a config.pbtxt, or `default` when it has none."""
    parameters = json.loads(model_config_json(config_path)).get("parameters", {})
    return parameters[key]["string_value"] if key in parameters else default


def config_input_dims(config_path: Path | str, name: str) -> list[int]:
    """The declared dims (batch dimension excluded) of one input of a config.pbtxt."""
    config = json.loads(model_config_json(config_path))
    (tensor,) = [t for t in config["input"] if t["name"] == name]
    return list(tensor["dims"])


def triton_args(
    config_path: Path | str,
    model_dir: Path | str,
    *,
    instance_kind: str = "CPU",
    device_id: int = 0,
    version: str = "1",
) -> dict[str, str]:
    """The `args` tritonserver passes to TritonPythonModel.initialize, for the first instance of
    the config's first instance group, with the model directory at `model_dir`."""
    config_json = model_config_json(config_path)
    config = json.loads(config_json)
    group = config["instance_group"][0]["name"]
    return {
        "model_config": config_json,
        "model_instance_kind": instance_kind,
        "model_instance_name": f"{group}_0",
        "model_instance_device_id": str(device_id),
        "model_repository": str(model_dir),
        "model_version": version,
        "model_name": config["name"],
    }


class TritonHarness:
    """Builds requests for, and reads responses from, models running against the fake module."""

    args = staticmethod(triton_args)
    set_parameters = staticmethod(set_parameters)
    config_parameter = staticmethod(config_parameter)

    def __init__(self, pb_utils: ModuleType) -> None:
        self.pb_utils = pb_utils

    @staticmethod
    def copy_model_dir(name: str, repository: Path) -> Path:
        """The checked-in model directory `name` (config.pbtxt, configs/, 1/model.py) copied to
        `repository`/`name`, without generated artefacts: tests add their own tiny ones."""
        target = repository / name
        shutil.copytree(
            MODEL_REPOSITORY / name,
            target,
            ignore=shutil.ignore_patterns(
                "model.onnx",
                "model.int8.onnx",
                "encoder.json",
                "tokenizer",
                "index",
                ".index.*",
                "__pycache__",
            ),
        )
        return target

    def initialize(self, model_py: Path | str, args: dict[str, str]) -> Any:
        """Loads model.py and runs TritonPythonModel.initialize(args), as the stub does."""
        model = load_triton_model(model_py).TritonPythonModel()
        model.initialize(args)
        return model

    def request(self, parameters: dict | None = None, **inputs: np.ndarray) -> Any:
        return self.pb_utils.InferenceRequest(
            inputs=[self.pb_utils.Tensor(name, value) for name, value in inputs.items()],
            parameters=parameters,
        )

    def outputs(self, response: Any) -> dict[str, np.ndarray]:
        """A successful response's tensors by name; fails the test on an error response."""
        assert isinstance(response, self.pb_utils.InferenceResponse), response
        assert not response.has_error(), response.error().message()
        tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
        assert len(tensors) == len(response.output_tensors()), "duplicate output names"
        return tensors

    def assert_invalid_arg(self, response: Any, *fragments: str) -> str:
        """Checks `response` is an INVALID_ARG error mentioning every fragment; returns its text."""
        assert isinstance(response, self.pb_utils.InferenceResponse), response
        assert response.has_error(), "expected an INVALID_ARG response, got outputs"
        error = response.error()
        assert error.code() == self.pb_utils.TritonError.INVALID_ARG, error
        assert response.output_tensors() == []
        for fragment in fragments:
            assert fragment in error.message(), (fragment, error.message())
        return error.message()

    def logged(self, level: str) -> list[str]:
        return [message for lvl, message in self.pb_utils.Logger.records if lvl == level]


@pytest.fixture
def triton(pb_utils: ModuleType) -> TritonHarness:
    return TritonHarness(pb_utils)


def unit_vectors(rows: int, dimension: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


# Made-up product titles: a few words recur in some titles only ("drill", "cordless",
# "hammer"), so BM25 has something to find; one title is non-ASCII, so titles are checked as
# UTF-8 bytes and not just ASCII.
TINY_TITLES = (
    "Cordless drill",
    "Café mug",
    "Hammer drill",
    "Garden hose",
    "Lawn mower battery",
    "LED light bulb",
    "Claw hammer",
    "Wood screw pack",
    "Paint roller",
    "Extension cord",
    "Cordless leaf blower",
    "Drill bit set",
)


def tiny_catalog(rows: int) -> list[Product]:
    """`rows` products sku-000, sku-001, ... titled from TINY_TITLES, then "Spare part N"."""
    return [
        Product(
            id=f"sku-{i:03d}", title=TINY_TITLES[i] if i < len(TINY_TITLES) else f"Spare part {i}"
        )
        for i in range(rows)
    ]


@dataclass(frozen=True)
class TinyIndex:
    index_dir: Path
    manifest: IndexManifest
    embeddings: np.ndarray  # [count, dimension] float32, row i is products[i]
    products: list[Product]

    def exact_top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force inner-product neighbours: (rows [n, k], scores [n, k]), best first."""
        scores = queries.astype(np.float64) @ self.embeddings.astype(np.float64).T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(scores, rows, axis=1)


def write_tiny_index(
    index_dir: Path,
    encoder_fingerprint: str,
    *,
    rows: int = 12,
    dimension: int = 384,
    seed: int = 0,
    products: list[Product] | None = None,
    embeddings: np.ndarray | None = None,
) -> TinyIndex:
    """An exact (flat) index, vectors and BM25 fields, written by the real index writer.

    By default `rows` random unit vectors for `tiny_catalog(rows)`; pass `products` and/or
    `embeddings` (row-aligned, unit length) to choose them."""
    from ecomsearch.index.builder import CatalogSnapshot, write_index

    if products is None:
        products = tiny_catalog(rows if embeddings is None else len(embeddings))
    if embeddings is None:
        embeddings = unit_vectors(len(products), dimension, seed)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(embeddings) != len(products):
        raise ValueError(f"{len(embeddings)} embeddings for {len(products)} products")
    # A frozen catalog (no store): keys are the rows, so tests can read candidates as rows.
    snapshot = CatalogSnapshot(
        products=list(products),
        keys=np.arange(len(products), dtype=np.int64),
        embeddings=embeddings,
        encoder_fingerprint=encoder_fingerprint,
        catalog_sha256=hashlib.sha256(b"tiny catalog").hexdigest(),
    )
    write_index(index_dir, snapshot)
    return TinyIndex(index_dir, IndexManifest.read(index_dir), embeddings, products)


@pytest.fixture
def tiny_index_factory() -> Callable[..., TinyIndex]:
    """`write_tiny_index` as a fixture, so test modules need not import conftest."""
    return write_tiny_index


ENCODER_STAND_IN = b"stand-in for the exported encoder graph"


@dataclass(frozen=True)
class TinyRepository:
    """A model repository in a temporary directory with what retrieve and select load: their
    model directories (checked-in config.pbtxt, configs/, 1/model.py), a stand-in encoder file,
    ranker/1/ranker.json and a tiny index in retrieve/1/index."""

    root: Path
    index: TinyIndex

    @property
    def layout(self) -> ModelRepositoryLayout:
        return ModelRepositoryLayout(self.root)

    @property
    def retrieve_dir(self) -> Path:
        return self.root / contract.RETRIEVE_MODEL

    @property
    def select_dir(self) -> Path:
        return self.root / contract.SELECT_MODEL

    @property
    def encoder_fingerprint(self) -> str:
        return hashlib.sha256(ENCODER_STAND_IN).hexdigest()


def write_ranker_info(path: Path, feature_names: list[str] | tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"feature_names": list(feature_names)}))


def write_tiny_repository(
    root: Path,
    *,
    rows: int = 12,
    dimension: int | None = None,
    seed: int = 0,
    products: list[Product] | None = None,
    embeddings: np.ndarray | None = None,
) -> TinyRepository:
    """Lays out a TinyRepository at `root`. The index dimension defaults to the retrieve
    config's embedding width, and its manifest records the stand-in encoder's checksum."""
    layout = ModelRepositoryLayout(root)
    layout.encoder_onnx.parent.mkdir(parents=True)
    layout.encoder_onnx.write_bytes(ENCODER_STAND_IN)
    write_ranker_info(layout.ranker_info, FEATURE_NAMES)
    for name in (contract.RETRIEVE_MODEL, contract.SELECT_MODEL):
        TritonHarness.copy_model_dir(name, root)
    if dimension is None:
        retrieve_config = root / contract.RETRIEVE_MODEL / "config.pbtxt"
        dimension = config_input_dims(retrieve_config, contract.EMBEDDING)[-1]
    index = write_tiny_index(
        layout.index_dir,
        hashlib.sha256(ENCODER_STAND_IN).hexdigest(),
        rows=rows,
        dimension=dimension,
        seed=seed,
        products=products,
        embeddings=embeddings,
    )
    return TinyRepository(root, index)


@pytest.fixture
def tiny_repository_factory(tmp_path: Path) -> Callable[..., TinyRepository]:
    """`write_tiny_repository` rooted in this test's tmp_path (call it once per test)."""

    def factory(**kwargs: Any) -> TinyRepository:
        return write_tiny_repository(tmp_path / "model_repository", **kwargs)

    return factory


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests/postgres.py); each test makes its own
    database with `postgres_server.create_database()`. Fails, never skips, when PostgreSQL is
    not installed: a skipped PostgreSQL test would hide a broken store."""
    try:
        server = PostgresServer()
    except PostgresNotInstalledError as e:
        pytest.fail(str(e))
    with server:
        yield server
