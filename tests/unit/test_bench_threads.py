"""The in-process pipeline of `ecomsearch bench` runs with the served models' thread settings."""

from __future__ import annotations

import os

import faiss
from threadpoolctl import threadpool_info

from ecomsearch.loadtest.bench import served_encoder_threads, served_thread_settings
from tests.project import MODEL_REPOSITORY


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_the_encoder_threads_are_the_served_configs():
    assert served_encoder_threads(MODEL_REPOSITORY, None) == 1  # config.pbtxt, the CPU profile
    # configs/gpu.pbtxt sets none: ONNX Runtime's default (0), as the GPU instance gets it.
    assert served_encoder_threads(MODEL_REPOSITORY, "gpu") == 0


def test_thread_settings_apply_inside_and_are_restored_after(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    faiss.omp_set_num_threads(2)
    blas_before = blas_threads()
    with served_thread_settings(MODEL_REPOSITORY, None) as encoder_threads:
        assert encoder_threads == 1
        assert faiss.omp_get_max_threads() == 1
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        assert blas_threads() <= {1}
    assert faiss.omp_get_max_threads() == 2
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    assert blas_threads() == blas_before
