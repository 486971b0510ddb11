"""The index manifest: what an index was built from, so a mismatched one refuses to load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# 2: BM25 fields in lexical/; 3: store keys (keys.npy), BM25 statistics, the catalog store
FORMAT_VERSION = 3

MANIFEST_FILE = "manifest.json"
FAISS_FILE = "index.faiss"
IDS_FILE = "ids.json"
KEYS_FILE = "keys.npy"  # int64 [count]: each row's product key in the catalog store
METADATA_FILE = "metadata.jsonl"
LEXICAL_DIR = "lexical"
DATA_FILES = (FAISS_FILE, IDS_FILE, KEYS_FILE, METADATA_FILE)


class IndexLoadError(RuntimeError):
    """An index directory is missing, corrupt, or does not match the served encoder."""


@dataclass(frozen=True)
class IndexManifest:
    encoder_fingerprint: str
    dimension: int
    count: int
    index_type: str  # "flat" (exact inner product) or "hnsw"
    catalog_sha256: str
    text_max_tokens: int
    built_at: str
    build_seconds: float
    index_params: dict[str, Any] = field(default_factory=dict)
    recall_at_100: float | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)
    # The catalog store the index was built from (its URL without a password, and its id), and
    # the change sequence number it was built at: a server applies the store's changes after it.
    # None for an index built without a store (a frozen catalog: tests and benchmarks).
    catalog_store: str | None = None
    catalog_store_id: str | None = None
    catalog_seq: int | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, index_dir: Path) -> IndexManifest:
        path = index_dir / MANIFEST_FILE
        if not path.is_file():
            raise IndexLoadError(
                f"no index at {index_dir} ({MANIFEST_FILE} missing); "
                "run `ecomsearch build-index --catalog FILE`"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexLoadError(f"{path} is corrupt: {e}") from e
        if not isinstance(raw, dict):
            raise IndexLoadError(f"{path} is corrupt: expected a JSON object")
        version = raw.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise IndexLoadError(
                f"{path}: format_version {version!r} is not the supported "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise IndexLoadError(f"{path} is corrupt: {e}") from e
