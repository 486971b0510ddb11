"""Every `model_warmup` of every profile's config, checked as tritonserver will use it: the
inputs match the model's declared ones, the data files decode to inputs of the contract, and
the requests, run through the models themselves (the fake backend), are answered without an
error: tritonserver fails a model's load when one of its warm-up requests fails. The writers
are never warmed up. Also the pure parts of loadtest/cold_start.py, which measures what
warm-up buys."""

from __future__ import annotations

import math
import shutil
import struct
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ecomsearch import contract
from ecomsearch.loadtest import cold_start
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.query import decode_queries
from ecomsearch.server.launcher import DROP_IN_BACKENDS
from tests.project import MODEL_REPOSITORY, PROJECT_ROOT

REPOSITORY = MODEL_REPOSITORY
LAYOUT = ModelRepositoryLayout(REPOSITORY)
CONFIG_FILES = ModelRepositoryLayout(REPOSITORY).config_files()
PROFILES = (None, "gpu")
WARMUP_DIR = "warmup"  # tritonserver reads input_data_file from <model directory>/warmup/
# The models whose first request was measurably slow without a warm-up (`ecomsearch
# bench-cold-start`): each instance's first request through the Python backend
# (the drop-in ONNX Runtime backend is one) costs 17-30 ms more than the next, and the
# cross-encoder's ~250 ms more. retrieve, recommend_candidates and similar_candidates showed no
# such cost; a change to this set is a change to measure first.
WARMED = {
    contract.PREPROCESS_MODEL,
    contract.ENCODER_MODEL,
    contract.RANKER_MODEL,
    contract.SELECT_MODEL,
    contract.RECOMMEND_RANKER_MODEL,
    contract.CROSS_ENCODER_MODEL,
}
# A warm-up is a real request: on these it would be a write to the catalog or the event log.
WRITERS = {contract.CATALOG_MODEL, contract.EVENTS_MODEL}
ONNX_MODELS = [
    contract.ENCODER_MODEL,
    contract.RANKER_MODEL,
    contract.RECOMMEND_RANKER_MODEL,
    contract.CROSS_ENCODER_MODEL,
]
NUMPY_TYPES = {
    mc.TYPE_BOOL: np.dtype(np.bool_),
    mc.TYPE_INT32: np.dtype("<i4"),
    mc.TYPE_INT64: np.dtype("<i8"),
    mc.TYPE_FP32: np.dtype("<f4"),
    mc.TYPE_FP64: np.dtype("<f8"),
}
# Checked in: a warm-up file is a request or two, never a data set.
MAX_WARMUP_FILE_BYTES = 4096


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def model_dir_of(config_path: Path) -> Path:
    return config_path.parent if config_path.name == "config.pbtxt" else config_path.parent.parent


def config_id(path: Path) -> str:
    return str(path.relative_to(REPOSITORY))


def decode_bytes_tensor(data: bytes) -> list[bytes]:
    """A BYTES tensor as tritonserver reads it from a file: each element a little-endian uint32
    length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError(f"a length is cut short at byte {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise ValueError(f"an element of {length} bytes is cut short at byte {offset}")
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def warmup_input(model_dir: Path, spec: mc.ModelWarmup.Input) -> np.ndarray:
    """One warm-up input's values, shaped as its dims (without the batch dimension)."""
    count = math.prod(spec.dims)
    source = spec.WhichOneof("input_data_type")
    if source == "input_data_file":
        data = (model_dir / WARMUP_DIR / spec.input_data_file).read_bytes()
        if spec.data_type == mc.TYPE_STRING:
            elements = decode_bytes_tensor(data)
            assert len(elements) == count, f"{spec.input_data_file}: {len(elements)} elements"
            values = np.empty(count, dtype=object)
            values[:] = elements
        else:
            dtype = NUMPY_TYPES[spec.data_type]
            # tritonserver reads the first bytes it needs; a longer file hides a mistake.
            assert len(data) == count * dtype.itemsize, f"{spec.input_data_file}: {len(data)} B"
            values = np.frombuffer(data, dtype=dtype).copy()
    elif source == "zero_data":
        if spec.data_type == mc.TYPE_STRING:
            values = np.full(count, b"", dtype=object)
        else:
            values = np.zeros(count, dtype=NUMPY_TYPES[spec.data_type])
    else:
        raise AssertionError(f"a warm-up input takes its data from {source!r}")
    return values.reshape(tuple(spec.dims))


def warmup_requests(config: mc.ModelConfig, model_dir: Path) -> list[list[dict[str, np.ndarray]]]:
    """Each sample's requests as tritonserver sends them in one execution: `batch_size`
    requests (times `count`), each with a batch of one when the model batches."""
    samples = []
    for sample in config.model_warmup:
        inputs = {
            name: warmup_input(model_dir, spec)[None, ...]
            if config.max_batch_size
            else warmup_input(model_dir, spec)
            for name, spec in sample.inputs.items()
        }
        for _ in range(max(sample.count, 1)):
            samples.append([inputs] * sample.batch_size)
    return samples


def warmups_of(profile: str | None) -> dict[str, mc.ModelConfig]:
    """The configs with a warm-up that tritonserver serves under `profile`, by model."""
    configs = {}
    for path in sorted(REPOSITORY.glob("*/config.pbtxt")):
        config = parse(LAYOUT.config_path(path.parent.name, profile))
        if config.model_warmup:
            configs[config.name] = config
    return configs


# --- The configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=config_id)
def test_warmup_inputs_are_the_models_declared_inputs(path: Path) -> None:
    config = parse(path)
    model_dir = model_dir_of(path)
    if config.platform == "ensemble":
        assert not config.model_warmup, "tritonserver refuses a warm-up on an ensemble"
    declared = {tensor.name: tensor for tensor in config.input}
    required = {name for name, tensor in declared.items() if not tensor.optional}
    names = [sample.name for sample in config.model_warmup]
    assert all(names) and len(set(names)) == len(names), names
    for sample in config.model_warmup:
        where = f"{config_id(path)}, warm-up {sample.name!r}"
        assert sample.batch_size >= 1, f"{where}: a batch of 0 is skipped"
        if config.max_batch_size == 0:
            assert sample.batch_size == 1, f"{where}: the model does not batch"
        else:
            assert sample.batch_size <= config.max_batch_size, where
        # An input the model does not declare would be sent as a control input.
        assert set(sample.inputs) <= set(declared), f"{where}: {set(sample.inputs)}"
        assert required <= set(sample.inputs), f"{where}: lacks {required - set(sample.inputs)}"
        for name, spec in sample.inputs.items():
            tensor = declared[name]
            assert spec.data_type == tensor.data_type, f"{where}: {name}"
            # Both without the batch dimension; every variable one made concrete.
            assert len(spec.dims) == len(tensor.dims), f"{where}: {name} {list(spec.dims)}"
            for warm, dim in zip(spec.dims, tensor.dims, strict=True):
                assert warm > 0 and dim in (-1, warm), f"{where}: {name} {list(spec.dims)}"
            source = spec.WhichOneof("input_data_type")
            # Random bytes make NaN floats and out-of-range ids, which the models refuse.
            assert source in ("zero_data", "input_data_file"), f"{where}: {name} {source}"
            if spec.data_type == mc.TYPE_STRING:
                # zero_data makes empty strings: a bad query, user or product id here.
                assert source == "input_data_file", f"{where}: {name}"
            if source == "input_data_file":
                file_name = spec.input_data_file
                assert PurePosixPath(file_name).name == file_name, f"{where}: {file_name}"
                assert (model_dir / WARMUP_DIR / file_name).is_file(), f"{where}: {file_name}"
            warmup_input(model_dir, spec)  # decodes to exactly its dims


@pytest.mark.parametrize("profile", PROFILES)
def test_the_warmed_up_models_are_the_measured_ones_and_never_the_writers(profile) -> None:
    warmed = set(warmups_of(profile))
    assert warmed == WARMED
    assert not warmed & WRITERS


def test_both_profiles_warm_up_with_the_same_requests() -> None:
    """A model with a GPU profile warms up there as on the CPU (on a GPU the first request
    also builds the TensorRT engine or the CUDA kernels' state: it matters more there)."""
    for path in sorted(REPOSITORY.glob("*/configs/gpu.pbtxt")):
        name = path.parent.parent.name
        gpu, cpu = parse(path), parse(REPOSITORY / name / "config.pbtxt")
        assert list(gpu.model_warmup) == list(cpu.model_warmup), name


def test_every_warmup_file_is_used_and_small() -> None:
    used = {
        model_dir_of(path) / WARMUP_DIR / spec.input_data_file
        for path in CONFIG_FILES
        for sample in parse(path).model_warmup
        for spec in sample.inputs.values()
        if spec.input_data_file
    }
    files = {path for path in REPOSITORY.glob(f"*/{WARMUP_DIR}/*") if path.is_file()}
    assert files == used
    for path in files:
        assert path.stat().st_size <= MAX_WARMUP_FILE_BYTES, path


def _packaged(relative: str, patterns: list[str]) -> bool:
    """setuptools' package-data glob: `*` stays within one path component."""
    parts = relative.split("/")
    return any(
        len(pattern.split("/")) == len(parts)
        and all(fnmatch(part, glob) for part, glob in zip(parts, pattern.split("/"), strict=True))
        for pattern in patterns
    )


def test_the_warmup_files_ship_with_the_package() -> None:
    """An installed server without them fails to load the models that name them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ecomsearch.model_repository"]
    for path in REPOSITORY.glob(f"*/{WARMUP_DIR}/*"):
        relative = str(path.relative_to(REPOSITORY))
        assert _packaged(relative, patterns), f"pyproject.toml's package-data misses {relative}"


# --- The data files hold inputs of the contract ---------------------------------------------------


def test_the_preprocess_warmup_is_a_real_query() -> None:
    config = parse(REPOSITORY / contract.PREPROCESS_MODEL / "config.pbtxt")
    for requests in warmup_requests(config, REPOSITORY / contract.PREPROCESS_MODEL):
        for inputs in requests:
            queries = decode_queries(inputs[contract.QUERY])  # the service's own validation
            assert all(len(query.split()) >= 2 for query in queries), queries


def test_the_select_warmup_names_no_product() -> None:
    """Padding (-1) is the only row valid in every catalog: a key would name a product of one
    catalog, and one the served catalog lacks makes the request (and the load) fail."""
    config = parse(REPOSITORY / contract.SELECT_MODEL / "config.pbtxt")
    for requests in warmup_requests(config, REPOSITORY / contract.SELECT_MODEL):
        for inputs in requests:
            rows = inputs[contract.CANDIDATE_ROWS]
            assert rows.size <= contract.MAX_CANDIDATES
            assert (rows == -1).all(), rows
            assert inputs[contract.CANDIDATE_SCORES].shape == rows.shape


# --- Run through the models (fake backend) ---------------------------------------------------


def run_warmup(triton, model, config: mc.ModelConfig, model_dir: Path) -> list[dict]:
    """Sends each sample's requests to `model` in one execute, as tritonserver does; returns
    the outputs of every response (the harness fails the test on an error response)."""
    outputs = []
    for requests in warmup_requests(config, model_dir):
        responses = model.execute([triton.request(**inputs) for inputs in requests])
        assert len(responses) == len(requests)
        outputs += [triton.outputs(response) for response in responses]
    return outputs


def require_exported(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path} missing: run `make test`, which exports the models first")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_warmups_run_on_the_served_graphs(triton, name: str, profile) -> None:
    """Through the drop-in ONNX Runtime backend, on the graph the profile serves (the GPU
    profile's float32 graph runs on the CPU here: its warm-up was never run on a GPU)."""
    config_path = LAYOUT.config_path(name, profile)
    config = parse(config_path)
    require_exported(LAYOUT.served_model_file(name, profile))
    model_dir = REPOSITORY / name
    args = triton.args(config_path, model_dir, instance_kind="GPU" if profile else "CPU")
    model = triton.initialize(DROP_IN_BACKENDS / "onnxruntime" / "model.py", args)
    for outputs in run_warmup(triton, model, config, model_dir):
        for value in outputs.values():
            assert np.isfinite(value).all(), f"{name}: a warm-up output is not finite"


def test_the_preprocess_warmup_runs_on_the_served_tokenizer(triton) -> None:
    require_exported(LAYOUT.tokenizer_dir)
    model_dir = REPOSITORY / contract.PREPROCESS_MODEL
    args = triton.args(model_dir / "config.pbtxt", model_dir)
    model = triton.initialize(model_dir / "1" / "model.py", args)
    config = parse(model_dir / "config.pbtxt")
    for outputs in run_warmup(triton, model, config, model_dir):
        mask = outputs[contract.ATTENTION_MASK]
        assert mask.shape[0] == 1 and mask.sum() > 2, "more than the start and end tokens"


def test_the_select_warmup_answers_empty_without_asking_the_store(
    triton, tiny_repository_factory
) -> None:
    repo = tiny_repository_factory()
    model_dir = repo.select_dir  # the checked-in select directory, warmup/ included
    args = triton.args(model_dir / "config.pbtxt", model_dir)
    model = triton.initialize(model_dir / "1" / "model.py", args)

    def no_store() -> None:
        raise AssertionError("the warm-up asked the catalog store for a product")

    model.model._catch_up = no_store
    config = parse(model_dir / "config.pbtxt")
    for outputs in run_warmup(triton, model, config, model_dir):
        assert set(outputs[contract.PRODUCT_IDS].flat) == {b""}


# --- loadtest/cold_start.py: repositories without warm-up, and the report's arithmetic ----------


def configs_copy(target: Path) -> Path:
    """The repository's configs (every profile's) and warm-up files, without the models."""
    for path in [*CONFIG_FILES, *REPOSITORY.glob(f"*/{WARMUP_DIR}/*")]:
        destination = target / path.relative_to(REPOSITORY)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    return target


def without_warmup_fields(config: mc.ModelConfig) -> mc.ModelConfig:
    stripped = mc.ModelConfig()
    stripped.CopyFrom(config)
    stripped.ClearField("model_warmup")
    return stripped


def test_strip_warmup_removes_only_the_named_models_warmup() -> None:
    config = parse(REPOSITORY / contract.RANKER_MODEL / "config.pbtxt")
    assert not cold_start.strip_warmup(config, {contract.PREPROCESS_MODEL})
    assert config.model_warmup
    assert cold_start.strip_warmup(config, {contract.RANKER_MODEL})
    assert not config.model_warmup
    assert not cold_start.strip_warmup(config), "nothing left to remove"


def test_without_warmup_rewrites_every_profile_and_changes_nothing_else(tmp_path: Path) -> None:
    repository = configs_copy(tmp_path / "repository")
    changed = cold_start.without_warmup(repository)
    warmed_files = {config_id(p) for p in CONFIG_FILES if parse(p).model_warmup}
    assert {str(p.relative_to(repository)) for p in changed} == warmed_files
    assert any("/configs/" in name for name in warmed_files), "a GPU profile is among them"
    for original in CONFIG_FILES:
        rewritten = parse(repository / original.relative_to(REPOSITORY))
        assert not rewritten.model_warmup
        assert rewritten == without_warmup_fields(parse(original)), config_id(original)
    assert cold_start.warmups(repository) == {}


def test_without_warmup_of_some_models_keeps_the_others(tmp_path: Path) -> None:
    repository = configs_copy(tmp_path / "repository")
    cold_start.without_warmup(repository, {contract.PREPROCESS_MODEL, contract.SELECT_MODEL})
    left = cold_start.warmups(repository)
    assert {label.split(" ")[0] for label in left} == WARMED - {
        contract.PREPROCESS_MODEL,
        contract.SELECT_MODEL,
    }
    assert "query_encoder (gpu)" in left


def test_log_load_seconds_spans_the_first_load_to_the_grpc_service() -> None:
    log = "\n".join(
        [
            'I1130 23:59:59.500000 1 server.cc:1] "CudaDriverHelper"',
            'I1130 23:59:59.750000 1 model_lifecycle.cc:472] "loading: catalog:1"',
            'I1130 23:59:59.800000 1 model_lifecycle.cc:472] "loading: select:1"',
            "I1201 00:00:06.250000 1 grpc_server.cc:2558] "
            '"Started GRPCInferenceService at 127.0.0.1:8001"',
        ]
    )
    assert cold_start.log_load_seconds(log) == pytest.approx(6.5)
    assert cold_start.log_load_seconds(log.split("\nI1201")[0]) is None


def test_model_times_are_per_request_queue_plus_compute() -> None:
    counters = ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")
    before = {"ranker": {"requests": 3, **dict.fromkeys(counters, 1_000_000)}}
    after = {
        "ranker": {"requests": 5, **dict.fromkeys(counters, 3_000_000)},
        "select": {"requests": 0, **dict.fromkeys(counters, 0)},
    }
    # Two requests, 4 counters x 2 ms between the snapshots: 4 ms each.
    assert cold_start.model_times_ms(before, after) == {"ranker": 4.0}


def test_warmup_time_counts_each_execution_once() -> None:
    at_ready = {
        # A warm-up of batch_size 32: 32 requests, each charged the execution's 300 ms.
        "cross_encoder": {"requests": 32, "execution_compute_ns": 300_000_000},
        "catalog": {"requests": 0, "execution_compute_ns": 0},
    }
    assert cold_start.warmup_times_ms(at_ready) == {"cross_encoder": 300.0}


def test_summaries_are_per_condition_median_and_range() -> None:
    runs = [
        {"condition": "with", "measures": {"search.first.ms": 10.0, "load.s": 7.0}},
        {"condition": "with", "measures": {"search.first.ms": 14.0, "load.s": None}},
        {"condition": "with", "measures": {"search.first.ms": 11.0}},
        {"condition": "without", "measures": {"search.first.ms": 90.0}},
    ]
    summary = cold_start.summarise(runs)
    assert summary["with"]["search.first.ms"] == {"median": 11.0, "min": 10.0, "max": 14.0, "n": 3}
    assert summary["with"]["load.s"]["n"] == 1
    assert summary["without"]["search.first.ms"]["median"] == 90.0
    report = {
        "conditions": ["with", "without"],
        "settings": {"repeats": 3, "steady_requests": 30},
        "cpus": 2,
        "created": "now",
        "warmups": {"ranker": ["400_candidates"]},
        "summary": summary,
    }
    table = cold_start.markdown(report)
    assert "| **search: first request, ms** | 11.0 (10.0-14.0) | 90.0 (90.0-90.0) |" in table


def test_the_conditions_alternate_between_repeats() -> None:
    assert cold_start.condition_order(["with", "without"], 0) == ["with", "without"]
    assert cold_start.condition_order(["with", "without"], 1) == ["without", "with"]
