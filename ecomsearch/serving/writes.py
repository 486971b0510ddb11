"""What the models that write to the store share (`catalog`, `events`): one request is one write
and one transaction, answered in turn; a write needs the server's write key when it has one;
a failed write answers INTERNAL with an error id, never a traceback or a connection string."""

from __future__ import annotations

import hmac
import json
import traceback
import uuid

import numpy as np

from ecomsearch import contract
from ecomsearch.errors import RequestError
from ecomsearch.serving.metrics import UNAUTHENTICATED, ModelMetrics, rejections


class StoreWriter:
    """Base of the writing models: the write key and the error answers."""

    # What the model writes, for messages: "catalog write", "event write".
    what = "write"

    def __init__(self, pb_utils, write_key: str | None = None) -> None:
        self.pb_utils = pb_utils
        self.logger = pb_utils.Logger
        # When set, a write must carry it (request parameter WRITE_KEY_PARAMETER).
        self.write_key = write_key
        # A served instance's (from_triton_args sets them): refused writes count by reason.
        self.metrics = ModelMetrics.disabled()

    def instrumented(self, args: dict) -> StoreWriter:
        """This model with the metrics of the instance Triton's `args` describe."""
        reasons = ("invalid_argument", "internal", "unavailable", "unsupported", UNAUTHENTICATED)
        self.metrics = ModelMetrics.of_instance(self.pb_utils, args).declare(rejections(*reasons))
        return self

    def authorised(self, request) -> bool:
        """Whether the request may write: no key is set, or it carries the key."""
        if self.write_key is None:
            return True
        try:
            given = json.loads(request.parameters() or "{}").get(contract.WRITE_KEY_PARAMETER)
        except (ValueError, AttributeError):
            return False
        # Compared in constant time: the answer must not tell how much of a guess was right.
        return isinstance(given, str) and hmac.compare_digest(
            given.encode("utf-8"), self.write_key.encode("utf-8")
        )

    def unauthorised(self):
        return self.error(
            f"this server takes writes only with its write key, in the request parameter "
            f"{contract.WRITE_KEY_PARAMETER!r} (ecomsearch clients: write_key=...)",
            self.pb_utils.TritonError.INVALID_ARG,
            reason=UNAUTHENTICATED,
        )

    def error(self, message: str, code: int, reason: str | None = None):
        """An error answer, counted by `reason` (by default the code's)."""
        pb_utils = self.pb_utils
        self.metrics.rejected(code, reason)
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message, code)
        )

    def internal(self, error: Exception):
        """INTERNAL: the traceback goes to the server log under an id, the writer gets the id
        (no paths, no connection strings)."""
        error_id = uuid.uuid4().hex[:12]
        self.logger.log_error(
            f"{self.what}: internal error {error_id}, nothing acknowledged: "
            + "".join(traceback.format_exception(type(error), error, error.__traceback__))
        )
        return self.error(
            f"the {self.what} failed (internal error {error_id}, see the server log); "
            "retrying the same write is safe",
            self.pb_utils.TritonError.INTERNAL,
        )

    def acknowledge(self, sequence_number: int, count_name: str, count: int):
        pb_utils = self.pb_utils
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(
                    contract.SEQUENCE_NUMBER, np.array([sequence_number], dtype=np.int64)
                ),
                pb_utils.Tensor(count_name, np.array([count], dtype=np.int64)),
            ]
        )


def byte_strings(raw: np.ndarray, name: str, what: str, limit: int) -> list[bytes]:
    """A [n] BYTES input of a write, 1..limit values, as bytes; or RequestError."""
    if raw.ndim != 1:
        raise RequestError(f"input {name!r} must have shape [n], got {list(raw.shape)}")
    if not 1 <= len(raw) <= limit:
        raise RequestError(
            f"{len(raw)} {what} in one write; a write holds 1 to {limit} (send more as "
            "several writes)"
        )
    return [value if isinstance(value, bytes) else str(value).encode("utf-8") for value in raw]


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{where} is not valid UTF-8 ({e.reason})") from None
