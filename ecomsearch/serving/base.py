"""Batching across requests and the two error levels shared by every Python model."""

from __future__ import annotations

import abc
import contextlib
import json
import os
import traceback
import uuid
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np

from ecomsearch.errors import RequestError
from ecomsearch.serving.metrics import MetricSpec, ModelMetrics, rejections

# One request's (or one batch's) tensors by name; every array has a row per query on axis 0.
Tensors = dict[str, np.ndarray]

__all__ = [
    "BatchedModel",
    "RequestError",
    "Tensors",
    "input_array",
    "int_parameter",
    "limit_native_threads",
    "model_config",
    "native_threads_limited",
    "parameter",
    "split_rows",
    "text_values",
]


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
    """Splits a batch back into per-request pieces (views); the counts must cover every row."""
    if sum(row_counts) != len(array):
        raise AssertionError(f"{len(array)} rows cannot be split as {list(row_counts)}")
    pieces, start = [], 0
    for count in row_counts:  # plain slices: np.split costs more than the work on small batches
        pieces.append(array[start : start + count])
        start += count
    return pieces


def text_values(raw: np.ndarray, name: str, limit_bytes: int) -> np.ndarray:
    """A BYTES input as an object array of str of the same shape; RequestError when a value is
    over limit_bytes or not UTF-8."""
    out = np.empty(raw.shape, dtype=object)
    flat, target = raw.reshape(-1), out.reshape(-1)
    for i, value in enumerate(flat):
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if len(data) > limit_bytes:
            raise RequestError(f"a value of {name!r} is longer than {limit_bytes} bytes")
        try:
            target[i] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input {name!r} must be UTF-8") from None
    return out


def limit_native_threads(threads: int = 1) -> None:
    """Caps the thread pools of the native libraries a Python model uses at `threads`: every
    BLAS library loaded in this process (numpy's OpenBLAS, FAISS's), and the tokenizers'.

    A model instance is a process, and Triton's instance groups are the parallelism: a pool of
    one thread per core inside each instance only oversubscribes the cores, and its idle
    workers spin after every call. Measured at concurrency 1 (2 cores): `retrieve` used 12.4 ms
    of CPU per request for 2.7 ms of work, a core burnt spinning in OpenBLAS; tokenizing two
    queries cost 185 us of CPU with the tokenizers' thread pool, 49 us without. OpenMP (FAISS's
    search) is left to its owner's parameter.
    """
    _apply_native_thread_limits(threads)


@contextlib.contextmanager
def native_threads_limited(threads: int = 1) -> Iterator[None]:
    """limit_native_threads for a block only: the previous limits come back on exit (the
    benchmark's in-process pipeline, which must run as the served models do without changing
    the baseline measured after it)."""
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    limits = _apply_native_thread_limits(threads)
    try:
        yield
    finally:
        limits.restore_original_limits()
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _apply_native_thread_limits(threads: int):
    """Applies the limits; returns threadpoolctl's handle, which can restore the BLAS ones."""
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=threads, user_api="blas")
    # Read by the tokenizers library when it next encodes a batch.
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return limits


def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class BatchedModel(abc.ABC):
    """pytriton's @batch for Python-backend models.

    `execute` parses each request (a RequestError becomes that request's INVALID_ARG response),
    groups the requests whose inputs can be stacked (`group_key`), concatenates each group's
    inputs along the batch axis, runs the group once, splits every output back by the requests'
    row counts, and returns exactly one response per request, in order. When `run` fails a
    group of several requests, each request is run alone so that only the bad one fails.

    No traceback or server path reaches a client: a RequestError is INVALID_ARG with its own
    message, and any other exception (a bug that one request's inputs trigger) is logged with its
    traceback under an id, and the request gets INTERNAL with that id only. A model that cannot
    serve at all fails in `initialize`, where Triton refuses to load it. Each error answer
    counts in `ecomsearch_requests_rejected_total` by reason (`metrics`, set by the server).
    """

    def __init__(self, pb_utils) -> None:
        self.pb_utils = pb_utils
        self.logger = pb_utils.Logger
        # A served instance's (from_triton_args sets them); off for a model built in-process.
        self.metrics = ModelMetrics.disabled()
        limit_native_threads(1)

    def instrumented(self, args: dict[str, Any]) -> BatchedModel:
        """This model with the metrics of the instance Triton's `args` describe, its counters
        created at 0 (`counters`)."""
        self.metrics = ModelMetrics.of_instance(self.pb_utils, args).declare(self.counters())
        return self

    def counters(self) -> list[tuple[MetricSpec, dict[str, str]]]:
        """The counter series this model publishes: its error answers' (extended by models
        that count more)."""
        return rejections("invalid_argument", "internal")

    @abc.abstractmethod
    def parse(self, request) -> Tensors:
        """Reads and validates one request's inputs; raises RequestError if they are bad."""

    @abc.abstractmethod
    def run(self, inputs: Tensors) -> Tensors:
        """Computes a batch: the concatenated inputs of one or more requests. Every output has a
        row per input row; a RequestError means the inputs were found bad while computing."""

    def group_key(self, inputs: Tensors) -> Hashable:
        """Requests with equal keys are concatenated and run together. By default, those whose
        inputs have the same names and the same shape beyond the batch axis."""
        return tuple((name, value.shape[1:]) for name, value in inputs.items())

    def finish(self, outputs: Tensors) -> Tensors:
        """One request's outputs after the split, before they are sent (default: as they are)."""
        return outputs

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[Hashable, list[tuple[int, Tensors, int]]] = {}
        for position, request in enumerate(requests):
            try:
                inputs = self.parse(request)
                rows = _row_count(inputs)
            except RequestError as e:
                responses[position] = self._invalid(e)
                continue
            except Exception as e:  # a bug: answered as INTERNAL, logged in full
                responses[position] = self._internal(e)
                continue
            groups.setdefault(self.group_key(inputs), []).append((position, inputs, rows))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members: list[tuple[int, Tensors, int]], responses: list[Any]) -> None:
        pb_utils = self.pb_utils
        if len(members) == 1:
            batch = members[0][1]
        else:
            batch = {
                name: np.concatenate([inputs[name] for _, inputs, _ in members])
                for name in members[0][1]
            }
        try:
            outputs = self.run(batch)
        except Exception as e:  # answered per request below; bugs logged in full
            if len(members) > 1:
                for member in members:  # find the culprit; the others still get their answers
                    self._run_group([member], responses)
            elif isinstance(e, RequestError):
                responses[members[0][0]] = self._invalid(e)
            else:
                responses[members[0][0]] = self._internal(e)
            return
        counts = [rows for _, _, rows in members]
        total = sum(counts)
        for name, value in outputs.items():
            if len(value) != total:
                raise pb_utils.TritonModelException(
                    f"internal error: output {name!r} has {len(value)} rows for a batch of {total}"
                )
        if len(members) == 1:
            per_request = [outputs]
        else:
            pieces = {name: split_rows(value, counts) for name, value in outputs.items()}
            per_request = [
                {name: split[i] for name, split in pieces.items()} for i in range(len(members))
            ]
        for (position, _, _), tensors in zip(members, per_request, strict=True):
            tensors = self.finish(tensors)
            responses[position] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()]
            )

    def _invalid(self, error: RequestError):
        pb_utils = self.pb_utils
        self.metrics.rejected(pb_utils.TritonError.INVALID_ARG)
        return pb_utils.InferenceResponse(
            output_tensors=[],
            error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG),
        )

    def _internal(self, error: Exception):
        """INTERNAL for a bug one request triggered: the traceback goes to the server log under
        an id, the client gets only the id (no paths, no code)."""
        pb_utils = self.pb_utils
        self.metrics.rejected(pb_utils.TritonError.INTERNAL)
        error_id = uuid.uuid4().hex[:12]
        name = type(self).__name__
        self.logger.log_error(
            f"{name}: internal error {error_id} on one request: "
            + "".join(traceback.format_exception(type(error), error, error.__traceback__))
        )
        return pb_utils.InferenceResponse(
            output_tensors=[],
            error=pb_utils.TritonError(
                f"{name} failed on this request (internal error {error_id}, see the server log)",
                pb_utils.TritonError.INTERNAL,
            ),
        )


def _row_count(inputs: Tensors) -> int:
    counts = {name: len(value) for name, value in inputs.items()}
    rows = set(counts.values())
    if len(rows) > 1:
        raise RequestError(f"inputs disagree on the batch size: {counts}")
    return rows.pop() if rows else 0
