"""Every config.pbtxt parsed with Triton's model_config protobuf and checked against the ONNX
graphs, the ensemble's maps, and the names and limits the Python models and the client use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from ecomsearch import contract
from ecomsearch.export.int8 import DEFAULT_WEIGHT_BITS
from ecomsearch.paths import ModelRepositoryLayout, version_numbers
from ecomsearch.ranking.features import FEATURE_NAMES
from tests.project import MODEL_REPOSITORY

REPOSITORY = MODEL_REPOSITORY
CONFIG_FILES = sorted([*REPOSITORY.glob("*/config.pbtxt"), *REPOSITORY.glob("*/configs/*.pbtxt")])
ONNX_TO_TRITON = {
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
}


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def default_configs() -> dict[str, mc.ModelConfig]:
    return {path.parent.name: parse(path) for path in REPOSITORY.glob("*/config.pbtxt")}


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == "ensemble"


def tensors(entries) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in entries}


def test_repository_has_the_pipeline_models():
    assert set(default_configs()) == {
        contract.PREPROCESS_MODEL,
        contract.ENCODER_MODEL,
        contract.RETRIEVE_MODEL,
        contract.RANKER_MODEL,
        contract.SELECT_MODEL,
        contract.SEARCH_MODEL,
        contract.SEARCH_UNRANKED_MODEL,
        contract.CATALOG_MODEL,
        contract.EVENTS_MODEL,
        contract.RECOMMEND_CANDIDATES_MODEL,
        contract.RECOMMEND_RANKER_MODEL,
        contract.RECOMMEND_MODEL,
        contract.SIMILAR_CANDIDATES_MODEL,
        contract.SIMILAR_MODEL,
        contract.CROSS_ENCODER_MODEL,
    }


# One request is one write and one store transaction: the writing models must not batch.
UNBATCHED = {contract.CATALOG_MODEL, contract.EVENTS_MODEL}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_config_parses_and_names_its_model(path):
    config = parse(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == model_dir.name
    if not is_ensemble(config):
        assert version_numbers(model_dir), f"{model_dir} has no version directory"
    if config.name in UNBATCHED:
        assert config.max_batch_size == 0
        assert not config.HasField("dynamic_batching"), "requests of one write must not merge"
        return
    assert config.max_batch_size > 0
    if not is_ensemble(config):
        assert config.HasField("dynamic_batching"), "a batching model without dynamic_batching"


# The bench's closed loop at this concurrency is the normal busy load: nothing may be shed.
NORMAL_CONCURRENCY = 16
# Admission control happens at one stage, the costliest (see its config.pbtxt for why only one).
GATE = contract.ENCODER_MODEL
# tritonserver 2.51 may leave a request queued under a queue policy for its 500 ms default wait.
TRITON_STALL_US = 500_000
CLIENT_DEFAULT_TIMEOUT_US = contract.DEFAULT_CLIENT_TIMEOUT_S * 1_000_000


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_the_gate_sheds_load_and_no_other_stage_has_a_queue_policy(path):
    config = parse(path)
    if is_ensemble(config):
        return  # an ensemble has no queue of its own
    batching = config.dynamic_batching
    if config.name != GATE:
        assert not batching.HasField("default_queue_policy"), (
            f"{path}: a queue policy here would stall requests (see {GATE}/config.pbtxt)"
        )
        return
    policy = batching.default_queue_policy
    assert batching.HasField("default_queue_policy"), path
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    # Above the stall (or light load is shed), below the client's deadline (or nothing is).
    assert TRITON_STALL_US < policy.default_timeout_microseconds < CLIENT_DEFAULT_TIMEOUT_US
    assert not policy.allow_timeout_override
    assert NORMAL_CONCURRENCY <= policy.max_queue_size <= contract.MAX_QUERIES_PER_REQUEST
    # A queue delay with a policy holds requests of another shape (preprocess/config.pbtxt).
    assert batching.max_queue_delay_microseconds == 0


def profile_config(name: str, profile: str | None) -> mc.ModelConfig:
    """The config Triton serves `name` from under `--model-config-name=profile`: the profile's
    file when the model has one, else config.pbtxt (tests/integration/test_profiles.py shows
    the fallback on a real server)."""
    path = REPOSITORY / name / "configs" / f"{profile}.pbtxt"
    return parse(path if profile and path.is_file() else REPOSITORY / name / "config.pbtxt")


def test_gpu_profiles_exist_only_where_they_differ_and_keep_the_tensors():
    profiles = sorted(REPOSITORY.glob("*/configs/gpu.pbtxt"))
    assert {p.parent.parent.name for p in profiles} == {
        contract.ENCODER_MODEL,
        contract.RETRIEVE_MODEL,
        contract.CROSS_ENCODER_MODEL,
    }
    for path in profiles:
        name = path.parent.parent.name
        gpu, config = parse(path), default_configs()[name]
        assert gpu != config, f"{path} repeats config.pbtxt: delete it, Triton falls back"
        assert tensors(gpu.input) == tensors(config.input), name
        assert tensors(gpu.output) == tensors(config.output), name
        assert gpu.backend == config.backend and gpu.max_batch_size == config.max_batch_size


def test_the_default_profile_runs_on_the_cpu():
    for name, config in default_configs().items():
        assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in config.instance_group), name


@pytest.mark.parametrize(
    "name", [contract.ENCODER_MODEL, contract.RETRIEVE_MODEL, contract.CROSS_ENCODER_MODEL]
)
def test_gpu_profile_places_an_instance_on_every_visible_gpu(name):
    (group,) = parse(REPOSITORY / name / "configs" / "gpu.pbtxt").instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU
    assert not group.gpus, "an explicit gpus list pins instances instead of using every GPU"


def graph_tensors(values) -> dict[str, tuple[int, list[int]]]:
    result = {}
    for value in values:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        assert dims[0].dim_param == "batch", f"{value.name}: first axis must be named batch"
        result[value.name] = (
            ONNX_TO_TRITON[tensor_type.elem_type],
            [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]],
        )
    return result


@pytest.mark.parametrize("profile", [None, "gpu"])
@pytest.mark.parametrize(
    ("name", "second_axis"),
    [
        (contract.ENCODER_MODEL, "sequence"),
        (contract.RANKER_MODEL, "candidates"),
        (contract.RECOMMEND_RANKER_MODEL, "candidates"),
        (contract.CROSS_ENCODER_MODEL, "sequence"),
    ],
)
def test_onnx_model_configs_match_their_graphs(name, second_axis, profile):
    layout = ModelRepositoryLayout(REPOSITORY)
    config = parse(layout.config_path(name, profile))
    assert config.backend == "onnxruntime"
    # The graph the profile serves: its config's default_model_filename, as Triton loads it.
    path = layout.served_model_file(name, profile)
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make test`, which exports the models first")
    graph = onnx.load(str(path), load_external_data=False).graph
    assert graph_tensors(graph.input) == tensors(config.input)
    assert graph_tensors(graph.output) == tensors(config.output)
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][:2] == [
        "batch",
        second_axis,
    ]


def test_the_cpu_profile_serves_the_int8_encoder_and_the_gpu_profile_float32():
    layout = ModelRepositoryLayout(REPOSITORY)
    cpu = layout.served_model_file(contract.ENCODER_MODEL)
    gpu = layout.served_model_file(contract.ENCODER_MODEL, "gpu")
    assert (cpu, gpu) == (layout.encoder_int8_onnx, layout.encoder_onnx)

    def integer_weights(path: Path) -> list[np.ndarray]:
        graph = onnx.load(str(path)).graph
        names = {node.input[1] for node in graph.node if node.op_type == "MatMulInteger"}
        return [numpy_helper.to_array(t) for t in graph.initializer if t.name in names]

    # Per-token int8 in the CPU profile (ecomsearch.export.int8): every weight within 7 bits,
    # which cannot saturate on CPUs without VNNI.
    weights = integer_weights(cpu)
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) <= 2 ** (DEFAULT_WEIGHT_BITS - 1) - 1
    assert integer_weights(gpu) == []
    # The index is built and fingerprinted with the float32 model in every profile.
    info = json.loads(layout.encoder_info.read_text())
    assert info["int8"]["file"] == cpu.name
    assert info["int8"]["min_cosine_to_pytorch"] >= info["int8"]["required_min_cosine"]


def test_ranker_was_trained_on_the_features_retrieve_computes():
    info = json.loads(ModelRepositoryLayout(REPOSITORY).ranker_info.read_text())
    assert info["feature_names"] == list(FEATURE_NAMES)
    (features,) = default_configs()[contract.RETRIEVE_MODEL].output[1:2]
    assert features.name == contract.CANDIDATE_FEATURES
    assert list(features.dims) == [-1, len(FEATURE_NAMES)]


def test_recommend_ranker_was_trained_on_the_features_its_candidates_carry():
    from ecomsearch.recommend.candidates import FEATURE_NAMES as RECOMMEND_FEATURES

    info = json.loads(ModelRepositoryLayout(REPOSITORY).recommender_info.read_text())
    assert info["feature_names"] == list(RECOMMEND_FEATURES)
    outputs = tensors(default_configs()[contract.RECOMMEND_CANDIDATES_MODEL].output)
    assert outputs[contract.CANDIDATE_FEATURES] == (mc.TYPE_FP32, [-1, len(RECOMMEND_FEATURES)])


ENSEMBLES = [
    contract.SEARCH_MODEL,
    contract.SEARCH_UNRANKED_MODEL,
    contract.RECOMMEND_MODEL,
    contract.SIMILAR_MODEL,
]


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_maps_refer_to_real_tensors_with_matching_types(name):
    configs = default_configs()
    ensemble = configs[name]
    assert is_ensemble(ensemble)
    available = {t.name: t.data_type for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert model.max_batch_size >= ensemble.max_batch_size, step.model_name
        model_inputs = {t.name: t for t in model.input}
        model_outputs = {t.name: t.data_type for t in model.output}
        for model_input, ensemble_tensor in step.input_map.items():
            assert model_input in model_inputs, (step.model_name, model_input)
            assert ensemble_tensor in available, f"{ensemble_tensor} is used before it is made"
            assert available[ensemble_tensor] == model_inputs[model_input].data_type
        required = {n for n, t in model_inputs.items() if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required)
        for model_output, ensemble_tensor in step.output_map.items():
            assert model_output in model_outputs, (step.model_name, model_output)
            available[ensemble_tensor] = model_outputs[model_output]
    for output in ensemble.output:
        assert available.get(output.name) == output.data_type, output.name


# The optional filters, one value per query, as ecomsearch.contract describes them.
FILTER_TENSORS = {
    contract.FILTER_CATEGORY: (mc.TYPE_STRING, [1]),
    contract.FILTER_BRAND: (mc.TYPE_STRING, [1]),
    contract.FILTER_MIN_PRICE: (mc.TYPE_FP32, [1]),
    contract.FILTER_MAX_PRICE: (mc.TYPE_FP32, [1]),
    contract.FILTER_IN_STOCK: (mc.TYPE_BOOL, [1]),
}
RESULT_TENSORS = {
    contract.PRODUCT_IDS: (mc.TYPE_STRING, [-1]),
    contract.SCORES: (mc.TYPE_FP32, [-1]),
    contract.TITLES: (mc.TYPE_STRING, [-1]),
    contract.PRICES: (mc.TYPE_FP32, [-1]),
    contract.IN_STOCK: (mc.TYPE_BOOL, [-1]),
}


def test_the_filter_tensors_are_the_contracts():
    assert set(FILTER_TENSORS) == set(contract.FILTER_INPUTS)


# What each ensemble takes before the filters (which all of them take, optional, at the end).
ENSEMBLE_INPUTS = {
    contract.SEARCH_MODEL: {contract.QUERY: (mc.TYPE_STRING, [1])},
    contract.SEARCH_UNRANKED_MODEL: {contract.QUERY: (mc.TYPE_STRING, [1])},
    contract.RECOMMEND_MODEL: {
        contract.USER_ID: (mc.TYPE_STRING, [1]),
        contract.RECENT_PRODUCT_IDS: (mc.TYPE_STRING, [-1]),
    },
    contract.SIMILAR_MODEL: {contract.PRODUCT_ID: (mc.TYPE_STRING, [1])},
}
# The step that takes the filters: the one that makes the candidates.
CANDIDATE_STEP = {
    contract.SEARCH_MODEL: contract.RETRIEVE_MODEL,
    contract.SEARCH_UNRANKED_MODEL: contract.RETRIEVE_MODEL,
    contract.RECOMMEND_MODEL: contract.RECOMMEND_CANDIDATES_MODEL,
    contract.SIMILAR_MODEL: contract.SIMILAR_CANDIDATES_MODEL,
}


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_contract_is_the_clients(name):
    ensemble = default_configs()[name]
    # Only the ranked search personalises, and has a ranker to explain.
    search_only = (
        {
            contract.USER_ID: (mc.TYPE_STRING, [1]),
            contract.EXPLAIN: (mc.TYPE_BOOL, [1]),
            contract.RERANK_DEPTH: (mc.TYPE_INT32, [1]),
        }
        if name == contract.SEARCH_MODEL
        else {}
    )
    assert tensors(ensemble.input) == {
        **ENSEMBLE_INPUTS[name],
        contract.TOP_K: (mc.TYPE_INT32, [1]),
        **FILTER_TENSORS,
        **search_only,
    }
    optional = [contract.TOP_K, *contract.FILTER_INPUTS]
    if name == contract.RECOMMEND_MODEL:
        optional = [contract.RECENT_PRODUCT_IDS, *optional]
    if name == contract.SEARCH_MODEL:  # personalised, explained and reranked search
        optional = [*optional, contract.USER_ID, contract.EXPLAIN, contract.RERANK_DEPTH]
    assert [t.name for t in ensemble.input if t.optional] == optional
    explained = (
        {contract.EXPLANATIONS: (mc.TYPE_STRING, [-1])} if name == contract.SEARCH_MODEL else {}
    )
    assert tensors(ensemble.output) == {**RESULT_TENSORS, **explained}
    assert ensemble.max_batch_size == contract.MAX_QUERIES_PER_REQUEST


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensembles_pass_the_filters_to_their_candidates_and_the_labels_from_select(name):
    """The maps test allows an optional input to go unmapped: a filter the ensemble accepted
    but never passed on would be silently ignored."""
    steps = {s.model_name: s for s in default_configs()[name].ensemble_scheduling.step}
    candidate_inputs = dict(steps[CANDIDATE_STEP[name]].input_map)
    passed_on = [*ENSEMBLE_INPUTS[name], *contract.FILTER_INPUTS]
    assert {f: candidate_inputs.get(f) for f in passed_on} == {f: f for f in passed_on}
    select_inputs = dict(steps[contract.SELECT_MODEL].input_map)
    assert select_inputs[contract.TOP_K] == contract.TOP_K
    # Only `search` is personalised; a user id it accepted must reach select.
    personal = {contract.USER_ID: contract.USER_ID} if name == contract.SEARCH_MODEL else {}
    assert {k: v for k, v in select_inputs.items() if k == contract.USER_ID} == personal
    # ... and its explain flag, with the candidates' features that the explanation needs.
    explained = (
        {
            contract.EXPLAIN: contract.EXPLAIN,
            contract.CANDIDATE_FEATURES: contract.CANDIDATE_FEATURES,
        }
        if name == contract.SEARCH_MODEL
        else {}
    )
    assert {k: v for k, v in select_inputs.items() if k in explained} == explained
    # ... and the query text with the rerank depth, which the cross-encoder needs; never
    # search_unranked's, which is the retrieval stage's order.
    reranked = (
        {contract.QUERY: contract.QUERY, contract.RERANK_DEPTH: contract.RERANK_DEPTH}
        if name == contract.SEARCH_MODEL
        else {}
    )
    assert {k: v for k, v in select_inputs.items() if k in reranked} == reranked
    select_outputs = dict(steps[contract.SELECT_MODEL].output_map)
    explanations = (
        {contract.EXPLANATIONS: contract.EXPLANATIONS} if name == contract.SEARCH_MODEL else {}
    )
    assert select_outputs == {**{t: t for t in RESULT_TENSORS}, **explanations}


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_models_use_the_contract_names(profile):
    preprocess = profile_config(contract.PREPROCESS_MODEL, profile)
    assert [t.name for t in preprocess.input] == [contract.QUERY, contract.MAX_TOKENS]
    assert [t.name for t in preprocess.input if t.optional] == [contract.MAX_TOKENS]
    assert [t.name for t in preprocess.output] == [contract.INPUT_IDS, contract.ATTENTION_MASK]
    retrieve = profile_config(contract.RETRIEVE_MODEL, profile)
    assert [t.name for t in retrieve.input] == [
        contract.QUERY,
        contract.EMBEDDING,
        *contract.FILTER_INPUTS,
    ]
    assert {t.name: (t.data_type, list(t.dims)) for t in retrieve.input if t.optional} == (
        FILTER_TENSORS
    )
    assert [t.name for t in retrieve.output] == [
        contract.CANDIDATE_ROWS,
        contract.CANDIDATE_FEATURES,
        contract.RETRIEVAL_SCORES,
    ]
    select = profile_config(contract.SELECT_MODEL, profile)
    assert [t.name for t in select.input] == [
        contract.CANDIDATE_ROWS,
        contract.CANDIDATE_SCORES,
        contract.TOP_K,
        contract.USER_ID,
        contract.CANDIDATE_FEATURES,
        contract.EXPLAIN,
        contract.QUERY,
        contract.RERANK_DEPTH,
    ]
    assert [t.name for t in select.input if t.optional] == [
        contract.TOP_K,
        contract.USER_ID,
        contract.CANDIDATE_FEATURES,
        contract.EXPLAIN,
        contract.QUERY,
        contract.RERANK_DEPTH,
    ]
    # The features select explains are exactly the ones retrieve makes and the ranker takes.
    select_features = next(t for t in select.input if t.name == contract.CANDIDATE_FEATURES)
    retrieve_features = next(t for t in retrieve.output if t.name == contract.CANDIDATE_FEATURES)
    assert (select_features.data_type, list(select_features.dims)) == (
        retrieve_features.data_type,
        list(retrieve_features.dims),
    )
    explanations = {contract.EXPLANATIONS: (mc.TYPE_STRING, [-1])}
    assert [t.name for t in select.output] == [*RESULT_TENSORS, contract.EXPLANATIONS]
    assert tensors(select.output) == {**RESULT_TENSORS, **explanations}
    ranker = profile_config(contract.RANKER_MODEL, profile)
    assert [t.name for t in ranker.input] == [contract.CANDIDATE_FEATURES]
    assert [t.name for t in ranker.output] == [contract.RANKING_SCORES]
    catalog = profile_config(contract.CATALOG_MODEL, profile)
    assert tensors(catalog.input) == {
        contract.PRODUCTS: (mc.TYPE_STRING, [-1]),
        contract.DELETE_IDS: (mc.TYPE_STRING, [-1]),
    }
    assert all(t.optional for t in catalog.input), "a request is an upsert or a delete"
    assert tensors(catalog.output) == {
        contract.SEQUENCE_NUMBER: (mc.TYPE_INT64, [1]),
        contract.CHANGED: (mc.TYPE_INT64, [1]),
    }
    events = profile_config(contract.EVENTS_MODEL, profile)
    assert tensors(events.input) == {
        contract.EVENT_USER_IDS: (mc.TYPE_STRING, [-1]),
        contract.EVENT_PRODUCT_IDS: (mc.TYPE_STRING, [-1]),
        contract.EVENT_KINDS_INPUT: (mc.TYPE_STRING, [-1]),
        contract.EVENT_QUANTITIES: (mc.TYPE_INT32, [-1]),
        contract.EVENT_TIMESTAMPS: (mc.TYPE_FP64, [-1]),
    }
    assert [t.name for t in events.input if t.optional] == [
        contract.EVENT_QUANTITIES,
        contract.EVENT_TIMESTAMPS,
    ]
    assert tensors(events.output) == {
        contract.SEQUENCE_NUMBER: (mc.TYPE_INT64, [1]),
        contract.RECORDED: (mc.TYPE_INT64, [1]),
    }
    recommend = profile_config(contract.RECOMMEND_CANDIDATES_MODEL, profile)
    assert [t.name for t in recommend.output] == [
        contract.CANDIDATE_ROWS,
        contract.CANDIDATE_FEATURES,
    ]
    similar = profile_config(contract.SIMILAR_CANDIDATES_MODEL, profile)
    assert tensors(similar.output) == {
        contract.CANDIDATE_ROWS: (mc.TYPE_INT64, [-1]),
        contract.CANDIDATE_SCORES: (mc.TYPE_FP32, [-1]),
    }
    cross_encoder = profile_config(contract.CROSS_ENCODER_MODEL, profile)
    assert tensors(cross_encoder.input) == {
        contract.INPUT_IDS: (mc.TYPE_INT64, [-1]),
        contract.ATTENTION_MASK: (mc.TYPE_INT64, [-1]),
        contract.TOKEN_TYPE_IDS: (mc.TYPE_INT64, [-1]),
    }
    assert tensors(cross_encoder.output) == {contract.RELEVANCE_LOGITS: (mc.TYPE_FP32, [1])}
    recommend_ranker = profile_config(contract.RECOMMEND_RANKER_MODEL, profile)
    assert [t.name for t in recommend_ranker.input] == [contract.CANDIDATE_FEATURES]
    assert [t.name for t in recommend_ranker.output] == [contract.RANKING_SCORES]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_parameters_are_tunables_never_paths_or_contract_limits(path):
    """Files are found by ModelRepositoryLayout and limits live in the contract: a parameter
    that named either would be a second source of the same fact."""
    from ecomsearch.serving.retrieve import RetrieveSettings

    config = parse(path)
    known = {
        contract.RETRIEVE_MODEL: set(RetrieveSettings.__dataclass_fields__),
        # How often select follows the catalog store, and its default rerank depth.
        contract.SELECT_MODEL: {"catalog_poll_interval_ms", "rerank_depth"},
        # The native ONNX Runtime backend's own parameter names (the drop-in honours them).
        contract.ENCODER_MODEL: {"intra_op_thread_count", "inter_op_thread_count"},
        contract.RANKER_MODEL: {"intra_op_thread_count", "inter_op_thread_count"},
        contract.RECOMMEND_RANKER_MODEL: {"intra_op_thread_count", "inter_op_thread_count"},
        contract.CROSS_ENCODER_MODEL: {"intra_op_thread_count", "inter_op_thread_count"},
        # The candidate models follow the catalog as retrieve does (ecomsearch.serving.recommend).
        contract.RECOMMEND_CANDIDATES_MODEL: {"catalog_poll_interval_ms", "compact_delta_rows"},
        contract.SIMILAR_CANDIDATES_MODEL: {"catalog_poll_interval_ms", "compact_delta_rows"},
    }.get(config.name, set())
    assert set(config.parameters) <= known, config.name


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_the_rerank_is_asked_for_not_on_by_default(profile):
    """select's default depth: 0 until a cross-encoder earns its cost (docs/relevance.md), and
    select's chunks of pairs within what cross_encoder batches."""
    from ecomsearch.serving.rerank import CROSS_ENCODER_MAX_PAIRS

    select = profile_config(contract.SELECT_MODEL, profile)
    assert int(select.parameters["rerank_depth"].string_value) == 0
    cross_encoder = profile_config(contract.CROSS_ENCODER_MODEL, profile)
    assert cross_encoder.max_batch_size == CROSS_ENCODER_MAX_PAIRS


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPOSITORY)))
def test_no_model_enables_the_response_cache(path):
    # tritonserver 2.51 caches a Python model's error response as an empty success: the second
    # identical bad request (or any request after a failed execution) gets OK and no outputs.
    assert not parse(path).response_cache.enable
