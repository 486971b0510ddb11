"""A fake `triton_python_backend_utils` for unit-testing model.py files without a server.

Inside tritonserver the Python backend stub injects the C++ classes (Tensor, InferenceRequest,
InferenceResponse, TritonError, TritonModelException, Logger) into the real module, beside its
pure-Python helpers. This fake mirrors the parts the models use, with the same strictness where
it is cheap: a misspelt attribute is an AttributeError (this is a plain module, not a mock), an
unsupported numpy dtype or an empty tensor name is refused as the stub refuses it, and Logger
takes only strings.

Logger keeps what was logged in `Logger.records` as (level, message) pairs; load a fresh copy of
this module per test (tests/conftest.py does) so records do not leak between tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# The dtypes the stub accepts for a Tensor (its numpy_to_triton_type); anything else, such as a
# numpy unicode array, is refused with "NumPy dtype is not supported."
_SUPPORTED_DTYPES = {np.dtype(t) for t in TRITON_STRING_TO_NUMPY.values()}


class TritonModelException(Exception):  # noqa: N818 (the real name)
    """Raised by the stub when the model itself is broken; fails the whole batch."""


class TritonError:
    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    _CODES = frozenset(range(8))

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        if not isinstance(message, str):
            raise TypeError(f"TritonError message must be a str, got {type(message).__name__}")
        if code not in self._CODES:
            raise TypeError(f"unknown TritonError code {code!r}")
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    def __init__(self, name: str, numpy_array: np.ndarray) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Tensor name must be a str, got {type(name).__name__}")
        if name == "":
            raise TritonModelException("Tensor name cannot be an empty string.")
        if not isinstance(numpy_array, np.ndarray):
            raise TypeError(
                f"Tensor {name!r} needs a numpy array, got {type(numpy_array).__name__}"
            )
        dtype = numpy_array.dtype
        if dtype not in _SUPPORTED_DTYPES and dtype.type is not np.bytes_:
            raise TritonModelException("NumPy dtype is not supported.")
        self._name = name
        # The stub makes a non-contiguous array contiguous and keeps it.
        self._array = np.ascontiguousarray(numpy_array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self._array.shape}, dtype={self._array.dtype})"


class InferenceRequest:
    def __init__(
        self,
        inputs: Sequence[Tensor],
        requested_output_names: Sequence[str] = (),
        model_name: str = "",
        parameters: dict | None = None,
    ) -> None:
        inputs = list(inputs)
        for tensor in inputs:
            if not isinstance(tensor, Tensor):
                raise TypeError(f"request inputs must be Tensors, got {type(tensor).__name__}")
        names = [tensor.name() for tensor in inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate input names in {names}")
        self._inputs = inputs
        self._requested_output_names = list(requested_output_names)
        self._model_name = model_name
        self._parameters = dict(parameters or {})

    def parameters(self) -> str:
        """The request's parameters as a JSON object, as the stub returns them."""
        import json

        return json.dumps(self._parameters)

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested_output_names)

    def model_name(self) -> str:
        return self._model_name


class InferenceResponse:
    def __init__(
        self, output_tensors: Sequence[Tensor] = (), error: TritonError | None = None
    ) -> None:
        output_tensors = list(output_tensors)
        for tensor in output_tensors:
            if not isinstance(tensor, Tensor):
                raise TypeError(f"output_tensors must be Tensors, got {type(tensor).__name__}")
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f"error must be a TritonError, got {type(error).__name__}")
        self._output_tensors = output_tensors
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._output_tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Logger:
    records: list[tuple[str, str]] = []  # noqa: RUF012 (shared on purpose, like the real Logger)

    @staticmethod
    def _record(level: str, message: str) -> None:
        if not isinstance(message, str):
            raise TypeError(f"Logger takes a str, got {type(message).__name__}")
        Logger.records.append((level, message))

    @staticmethod
    def log_info(message: str) -> None:
        Logger._record("INFO", message)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger._record("WARNING", message)

    @staticmethod
    def log_error(message: str) -> None:
        Logger._record("ERROR", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger._record("VERBOSE", message)


class MetricFamily:
    """Custom metrics, as the stub's MetricFamily: a family per name (registered again with the
    same kind and description, it is the same family; otherwise refused), metrics per label
    set. What the models published is readable from `MetricFamily.registry`."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    registry: dict[str, MetricFamily] = {}  # noqa: RUF012 (per fresh module, like Logger)
    _NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

    def __init__(self, name: str, description: str, kind: int) -> None:
        if not isinstance(name, str) or not self._NAME.fullmatch(name):
            raise TritonModelException(f"invalid metric family name {name!r}")
        if not isinstance(description, str):
            raise TypeError("description must be a str")
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"unknown metric kind {kind!r}")
        known = MetricFamily.registry.get(name)
        if known is not None and (known.kind, known.description) != (kind, description):
            raise TritonModelException(
                f"metric family {name!r} is already registered with another kind or description"
            )
        self.name, self.description, self.kind = name, description, kind
        self.metrics: dict[tuple[tuple[str, str], ...], Metric] = (
            known.metrics if known is not None else {}
        )
        MetricFamily.registry[name] = self

    def Metric(self, labels: dict[str, str] | None = None, buckets=None) -> Metric:  # noqa: N802
        labels = dict(labels or {})
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metric labels must be str: str, got {key!r}: {value!r}")
        if (buckets is not None) != (self.kind == self.HISTOGRAM):
            raise TritonModelException("buckets are for histograms, and histograms need them")
        key = tuple(sorted(labels.items()))
        metric = self.metrics.get(key)
        if metric is None:
            metric = self.metrics[key] = Metric(self, labels)
        return metric

    def value(self, **labels: str) -> float:
        """The value of the series with exactly these labels (KeyError when none)."""
        return self.metrics[tuple(sorted(labels.items()))].value()


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str]) -> None:
        self.family = family
        self.labels = labels
        self._value = 0.0

    def increment(self, value: float) -> None:
        if not isinstance(value, float | int) or isinstance(value, bool):
            raise TypeError(f"increment takes a number, got {type(value).__name__}")
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("a counter cannot be decremented")
        if self.family.kind == MetricFamily.HISTOGRAM:
            raise TritonModelException("a histogram is observed, not incremented")
        self._value += value

    def set(self, value: float) -> None:
        if self.family.kind != MetricFamily.GAUGE:
            raise TritonModelException("only a gauge can be set")
        self._value = float(value)

    def value(self) -> float:
        return self._value


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def triton_string_to_numpy(triton_type_string: str):
    return TRITON_STRING_TO_NUMPY[triton_type_string]
