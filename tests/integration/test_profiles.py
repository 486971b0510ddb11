"""Hardware profiles: a model with no `configs/<profile>.pbtxt` is served from its config.pbtxt
(Triton's fallback), which is why only the models whose GPU profile differs carry one."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ecomsearch import contract
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.server.launcher import TritonServer

from .conftest import copy_model_repository

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE_DELAY_US = 777


def test_models_without_the_profile_fall_back_to_config_pbtxt(model_repository, tmp_path):
    import tritonclient.grpc as grpcclient

    repository = copy_model_repository(tmp_path / "repository")
    index_dir = ModelRepositoryLayout(repository).index_dir
    index_dir.symlink_to(ModelRepositoryLayout(model_repository).index_dir, True)
    # A CPU-only profile, "probe", for select alone: it differs by its queue delay.
    select_dir = repository / contract.SELECT_MODEL
    probe = text_format.Parse(
        (select_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    probe.dynamic_batching.max_queue_delay_microseconds = PROBE_DELAY_US
    (select_dir / "configs" / "probe.pbtxt").parent.mkdir(exist_ok=True)
    (select_dir / "configs" / "probe.pbtxt").write_text(text_format.MessageToString(probe))

    with (
        TritonServer.local(
            repository, tmp_path / "server.log", model_config_name="probe"
        ) as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        served = {
            name: client.get_model_config(name).config
            for name in (contract.SELECT_MODEL, contract.PREPROCESS_MODEL)
        }
        ready = client.is_model_ready(contract.SEARCH_MODEL)

    assert ready
    assert served[contract.SELECT_MODEL].dynamic_batching.max_queue_delay_microseconds == (
        PROBE_DELAY_US
    )
    default = text_format.Parse(
        (repository / contract.PREPROCESS_MODEL / "config.pbtxt").read_text(),
        model_config_pb2.ModelConfig(),
    )
    preprocess = served[contract.PREPROCESS_MODEL]
    assert not (repository / contract.PREPROCESS_MODEL / "configs" / "probe.pbtxt").exists()
    assert (
        preprocess.dynamic_batching.max_queue_delay_microseconds
        == default.dynamic_batching.max_queue_delay_microseconds
        != PROBE_DELAY_US
    )
    assert preprocess.instance_group[0].count == default.instance_group[0].count
