"""The client installs and imports with tritonclient[grpc] and numpy alone."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "faiss", "onnxruntime", "tokenizers", "bm25s", "onnx")


def test_importing_the_client_and_cli_search_pulls_in_no_heavy_dependency():
    probe = (
        "import sys\n"
        "import ecomsearch.client, ecomsearch.cli\n"
        "ecomsearch.cli.build_parser().parse_args(['search', 'mouse'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == "[]", completed.stdout


def test_the_client_extra_needs_nothing_beyond_the_base_dependencies():
    from pathlib import Path

    import tomllib

    from tests.project import PROJECT_ROOT

    project = tomllib.loads(Path(PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("[")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert base == {"numpy", "tritonclient"}
    assert project["optional-dependencies"]["client"] == []
