"""Shared test helpers: the fake Python-backend module, loading model.py files, the `args`
tritonserver passes to initialize, and tiny index directories.

Test modules reach these through fixtures (`pb_utils`, `triton`, `tiny_index_factory`) rather
than by importing conftest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from ecomsearch.catalog import Product
from ecomsearch.index.manifest import IndexManifest
from ecomsearch.paths import PROJECT_ROOT

MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
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
                "model.onnx", "encoder.json", "tokenizer", "index", "__pycache__"
            ),
        )
        return target

    def initialize(self, model_py: Path | str, args: dict[str, str]) -> Any:
        """Loads model.py and runs TritonPythonModel.initialize(args), as the stub does."""
        model = load_triton_model(model_py).TritonPythonModel()
        model.initialize(args)
        return model

    def request(self, **inputs: np.ndarray) -> Any:
        return self.pb_utils.InferenceRequest(
            inputs=[self.pb_utils.Tensor(name, value) for name, value in inputs.items()]
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
) -> TinyIndex:
    """An exact (flat) index of `rows` random unit vectors, written by the real index writer."""
    from ecomsearch.index.builder import _write_index_dir, make_faiss_index

    embeddings = unit_vectors(rows, dimension, seed)
    # One non-ASCII title, so titles are checked as UTF-8 bytes and not just ASCII.
    products = [
        Product(id=f"sku-{i:03d}", title="Café mug" if i == 1 else f"Product {i}")
        for i in range(rows)
    ]
    faiss_index, params = make_faiss_index(embeddings, "flat")
    manifest = IndexManifest(
        encoder_fingerprint=encoder_fingerprint,
        dimension=dimension,
        count=rows,
        index_type="flat",
        index_params=params,
        catalog_sha256=hashlib.sha256(b"tiny catalog").hexdigest(),
        text_max_tokens=128,
        built_at="2024-01-01T00:00:00+00:00",
        build_seconds=0.0,
    )
    _write_index_dir(index_dir, faiss_index, products, manifest)
    return TinyIndex(index_dir, IndexManifest.read(index_dir), embeddings, products)


@pytest.fixture
def tiny_index_factory() -> Callable[..., TinyIndex]:
    """`write_tiny_index` as a fixture, so test modules need not import conftest."""
    return write_tiny_index
