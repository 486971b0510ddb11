"""Errors that the command line reports as one line and a non-zero exit, not a traceback.

Each module below imports only numpy and the standard library at import time.
"""

from __future__ import annotations

from ecomsearch.catalog import CatalogError
from ecomsearch.evaluation.metrics import JudgmentsError
from ecomsearch.export.checks import ExportValidationError
from ecomsearch.index.manifest import IndexLoadError

USER_FACING_ERRORS: tuple[type[BaseException], ...] = (
    CatalogError,
    ExportValidationError,
    FileNotFoundError,
    IndexLoadError,
    JudgmentsError,
)
