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
