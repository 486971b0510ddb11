"""The shipped warm-ups on a real tritonserver: every instance of every warmed model runs its
samples at load (a failed one would fail the load), before any client request, and nothing
else is sent a request (never the writers); a reload, how the watchdog replaces a dead stub,
runs them again. tests/unit/test_warmup.py checks the samples themselves."""

from __future__ import annotations

import re

import pytest

from ecomsearch import contract
from ecomsearch.client import SearchClient
from ecomsearch.paths import ModelRepositoryLayout, read_model_config
from ecomsearch.server.launcher import TritonServer

from .conftest import copy_model_repository

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def warmed_models(repository) -> dict[str, tuple[int, list[str], int]]:
    """Per model with a warm-up: its instance count, sample names and warm-up requests."""
    found = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = read_model_config(path)
        if not config.model_warmup:
            continue
        instances = sum(group.count or 1 for group in config.instance_group)
        requests = sum(s.batch_size * max(s.count, 1) for s in config.model_warmup)
        found[config.name] = (
            instances,
            [sample.name for sample in config.model_warmup],
            instances * requests,
        )
    return found


def warmup_runs(log_text: str, model: str, sample: str) -> list[str]:
    """The instances tritonserver's verbose log says ran `sample` of `model`, once per run."""
    pattern = rf"model '{re.escape(model)}' instance (\S+) is running warmup sample '{sample}'"
    return re.findall(pattern, log_text)


def test_every_warmed_instance_runs_its_warmup_and_a_reload_runs_it_again(
    model_repository, tmp_path
):
    import tritonclient.grpc as grpcclient

    repository = copy_model_repository(tmp_path / "repository")
    ModelRepositoryLayout(repository).index_dir.symlink_to(
        ModelRepositoryLayout(model_repository).index_dir, True
    )
    warmed = warmed_models(repository)
    assert contract.PREPROCESS_MODEL in warmed and contract.SELECT_MODEL in warmed
    log_path = tmp_path / "server.log"
    # Verbose: tritonserver logs each warm-up sample it runs at level 1 only.
    with TritonServer.local(repository, log_path, log_verbose=1) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics(as_json=True, headers=server.admin_headers)
        served = {}
        for model in stats["model_stats"]:
            inference = model.get("inference_stats", {})
            served[model["name"]] = (
                int(inference.get("success", {}).get("count", 0)),
                int(inference.get("fail", {}).get("count", 0)),
            )
        log_text = log_path.read_text(errors="replace")
        server.reload_model(contract.PREPROCESS_MODEL)
        reloaded_log = log_path.read_text(errors="replace")
        with SearchClient(server.grpc_url, timeout_s=30) as search:
            hits = search.search("wireless gaming mouse", k=3)

    # Before any client request: exactly the warm-up requests, all answered, warmed models only.
    assert served == {name: ((warmed[name][2] if name in warmed else 0), 0) for name in served}, (
        "requests (ok, failed) per model before the first client request"
    )
    assert served[contract.CATALOG_MODEL] == served[contract.EVENTS_MODEL] == (0, 0)
    assert "failed to run warmup sample" not in reloaded_log
    for model, (instances, samples, _) in warmed.items():
        for sample in samples:
            ran = warmup_runs(log_text, model, sample)
            assert len(ran) == len(set(ran)) == instances, (model, sample, ran)
    (sample,) = warmed[contract.PREPROCESS_MODEL][1]
    assert len(warmup_runs(reloaded_log, contract.PREPROCESS_MODEL, sample)) == 2
    assert len(hits) == 3
