"""Importing `ssl` inside an embedded interpreter whose standard library is another build's.

Triton's Python backend stub from the nvidia-pytriton wheel embeds the system's libpython but
imports the standard library of the `python3` first on PATH (the virtual environment's, which
may come from another build of the same version, such as pyenv's), and ignores PYTHONPATH.
Pure-Python modules do not mind; an extension module built for a later patch release can need
symbols the running libpython lacks: pyenv 3.11.7's `_ssl` needs `_PyModule_Add`, which Debian's
3.11.2 does not have. psycopg's C wrapper imports `ssl` (for libcrypto's callbacks), so without
this the PostgreSQL store cannot load in a Python model. Everywhere else (the NGC container, a
plain interpreter) `import ssl` just works and nothing here runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def system_extension_dirs() -> list[Path]:
    """Where the system's Python of this version keeps its extension modules (Debian's)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [
        Path(f"/usr/lib/python{version}/lib-dynload"),
        Path(f"/usr/lib64/python{version}/lib-dynload"),
    ]


def import_ssl() -> None:
    """`import ssl`, loading `_ssl` from the system's extension directory when the one on the
    path was built for another libpython than the running one."""
    try:
        import ssl

        return
    except ImportError as e:
        if "undefined symbol" not in str(e):
            raise
        failure = e
    for directory in system_extension_dirs():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = directory / f"_ssl{suffix}"
            if not path.is_file():
                continue
            spec = importlib.util.spec_from_file_location("_ssl", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["_ssl"] = module
            import ssl  # noqa: F401  (now finds the loaded _ssl)

            return
    raise failure
