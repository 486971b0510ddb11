"""Batching across requests and the two error levels shared by every Python model."""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np

Parsed = TypeVar("Parsed")


class RequestError(ValueError):
    """One request is malformed: it is answered with INVALID_ARG, its neighbours still run."""


def model_config(args: dict[str, Any]) -> dict[str, Any]:
    return json.loads(args["model_config"])


def parameter(config: dict[str, Any], key: str, default: str) -> str:
    """A string from the config's `parameters` map, or `default` when absent."""
    entry = config.get("parameters", {}).get(key)
    return default if entry is None else str(entry["string_value"])


def int_parameter(config: dict[str, Any], key: str, default: int, minimum: int = 0) -> int:
    raw = parameter(config, key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter {key!r} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"parameter {key!r} must be >= {minimum}, got {value}")
    return value


def split_rows(array: np.ndarray, row_counts: Sequence[int]) -> list[np.ndarray]:
    """Splits a batch back into per-request pieces; the counts must cover every row."""
    if sum(row_counts) != len(array):
        raise AssertionError(f"{len(array)} rows cannot be split as {list(row_counts)}")
    return np.split(array, np.cumsum(row_counts)[:-1]) if row_counts else []


def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class BatchedModel(abc.ABC, Generic[Parsed]):
    """pytriton's @batch for Python-backend models.

    `execute` parses each request (a RequestError becomes that request's INVALID_ARG response),
    hands every parsed request to `run` at once, and returns exactly one response per request,
    in order. Anything else that goes wrong is the model's fault and raises.
    """

    def __init__(self, pb_utils) -> None:
        self.pb_utils = pb_utils
        self.logger = pb_utils.Logger

    @abc.abstractmethod
    def parse(self, request) -> Parsed:
        """Reads and validates one request's inputs; raises RequestError if they are bad."""

    @abc.abstractmethod
    def run(self, parsed: list[Parsed]) -> list[dict[str, np.ndarray] | RequestError]:
        """Computes all parsed requests together; returns output tensors per request, or a
        RequestError for a request found bad only while computing."""

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        pb_utils = self.pb_utils
        responses: list[Any] = [None] * len(requests)
        parsed: list[Parsed] = []
        positions: list[int] = []
        for position, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
                positions.append(position)
            except RequestError as e:
                responses[position] = self._invalid(e)
        if parsed:
            outputs = self.run(parsed)
            if len(outputs) != len(parsed):
                raise pb_utils.TritonModelException(
                    f"internal error: {len(outputs)} results for {len(parsed)} requests"
                )
            for position, tensors in zip(positions, outputs, strict=True):
                if isinstance(tensors, RequestError):
                    responses[position] = self._invalid(tensors)
                    continue
                responses[position] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()]
                )
        return responses

    def _invalid(self, error: RequestError):
        pb_utils = self.pb_utils
        return pb_utils.InferenceResponse(
            output_tensors=[],
            error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG),
        )
