"""Loading a built index: FAISS index, row-aligned ids and metadata, checked by its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch.fingerprint import file_sha256
from ecomsearch.index.manifest import (
    DATA_FILES,
    FAISS_FILE,
    IDS_FILE,
    KEYS_FILE,
    LEXICAL_DIR,
    METADATA_FILE,
    IndexLoadError,
    IndexManifest,
)


@dataclass
class CatalogIndex:
    manifest: IndexManifest
    faiss_index: Any  # None when loaded without vectors
    ids: np.ndarray  # object array of UTF-8 bytes, row-aligned with the FAISS index
    keys: np.ndarray  # int64: each row's product key in the catalog store
    titles: np.ndarray  # object array of UTF-8 bytes
    metadata: list[dict[str, Any]]
    index_dir: Path  # the directory the files were read from (symlinks resolved)

    @property
    def count(self) -> int:
        return self.manifest.count

    def load_lexical(self):
        """The BM25 fields built beside the vectors (`lexical/`)."""
        from ecomsearch.lexical import LexicalIndex

        try:
            return LexicalIndex.load(self.index_dir / LEXICAL_DIR)
        except (OSError, ValueError, KeyError) as e:
            raise IndexLoadError(f"{self.index_dir / LEXICAL_DIR} is corrupt: {e}") from e

    def labels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Product ids and titles (UTF-8 bytes, object arrays shaped like `rows`) of candidate
        rows; empty where a row is -1, the padding of a query with fewer candidates than asked."""
        padding = rows < 0
        safe = np.where(padding, 0, rows)
        ids, titles = self.ids[safe], self.titles[safe]
        if padding.any():
            ids[padding], titles[padding] = b"", b""
        return ids, titles

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores [n, k'] float32 and rows [n, k'] int64, k' <= count."""
        k = min(k, self.count)
        scores, rows = self.faiss_index.search(np.ascontiguousarray(embeddings, np.float32), k)
        return scores, rows

    @classmethod
    def load(
        cls,
        index_dir: Path | str,
        encoder_fingerprint: str | None = None,
        dimension: int | None = None,
        verify_checksums: bool = True,
        load_vectors: bool = True,
    ) -> CatalogIndex:
        """Loads and checks an index; raises IndexLoadError with a message naming the problem.

        With load_vectors=False only ids and metadata are read (faiss_index is None), for
        models that present results but do not search.
        """
        import faiss

        index_dir = Path(index_dir)
        # Every file is read from the one directory `index_dir` resolves to now (a versioned
        # directory, see ecomsearch.index.atomic), so a rebuild that switches the symlink
        # while this loads cannot mix two builds' files. Messages name `index_dir` as given.
        files = index_dir.resolve()
        manifest = IndexManifest.read(files)
        if encoder_fingerprint is not None and manifest.encoder_fingerprint != encoder_fingerprint:
            raise IndexLoadError(
                f"index at {index_dir} was built with encoder {manifest.encoder_fingerprint[:12]} "
                f"but the served encoder is {encoder_fingerprint[:12]}; "
                "rebuild it with `ecomsearch build-index`"
            )
        if dimension is not None and manifest.dimension != dimension:
            raise IndexLoadError(
                f"index at {index_dir} has dimension {manifest.dimension}, "
                f"the encoder produces {dimension}"
            )
        for name in sorted(set(DATA_FILES) | set(manifest.file_sha256)):
            if not (files / name).is_file():
                raise IndexLoadError(f"index at {index_dir} is incomplete: {name} missing")
            if name == FAISS_FILE and not load_vectors:
                continue
            expected = manifest.file_sha256.get(name)
            if verify_checksums and expected and file_sha256(files / name) != expected:
                raise IndexLoadError(
                    f"{index_dir / name} is corrupt: its checksum differs from the manifest"
                )

        faiss_index = None
        if load_vectors:
            try:
                faiss_index = faiss.read_index(str(files / FAISS_FILE))
            except RuntimeError as e:
                raise IndexLoadError(f"{index_dir / FAISS_FILE} is corrupt: {e}") from e
        try:
            keys = np.load(files / KEYS_FILE, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexLoadError(f"{index_dir / KEYS_FILE} is corrupt: {e}") from e
        if keys.dtype != np.int64 or keys.ndim != 1 or len(np.unique(keys)) != len(keys):
            raise IndexLoadError(f"{index_dir / KEYS_FILE} is corrupt: keys must be distinct int64")
        try:
            ids = json.loads((files / IDS_FILE).read_text(encoding="utf-8"))
            with open(files / METADATA_FILE, encoding="utf-8") as stream:
                metadata = [json.loads(line) for line in stream]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexLoadError(f"index at {index_dir} is corrupt: {e}") from e
        if not all(isinstance(i, str) for i in ids) or not all(
            isinstance(record, dict) and isinstance(record.get("title"), str) for record in metadata
        ):
            raise IndexLoadError(
                f"index at {index_dir} is corrupt: ids must be strings and every metadata record "
                "needs a title"
            )

        counts = {
            "manifest": manifest.count,
            IDS_FILE: len(ids),
            KEYS_FILE: len(keys),
            METADATA_FILE: len(metadata),
        }
        if faiss_index is not None:
            counts[FAISS_FILE] = int(faiss_index.ntotal)
        if len(set(counts.values())) != 1:
            raise IndexLoadError(f"index at {index_dir} is inconsistent: product counts {counts}")
        if faiss_index is not None:
            if int(faiss_index.d) != manifest.dimension:
                raise IndexLoadError(
                    f"{FAISS_FILE} has dimension {faiss_index.d}, manifest says "
                    f"{manifest.dimension}"
                )
            if "ef_search" in manifest.index_params and hasattr(faiss_index, "hnsw"):
                faiss_index.hnsw.efSearch = int(manifest.index_params["ef_search"])

        return cls(
            manifest=manifest,
            faiss_index=faiss_index,
            ids=_bytes_array(ids),
            keys=keys,
            titles=_bytes_array(record["title"] for record in metadata),
            metadata=metadata,
            index_dir=files,  # load_lexical reads the same version
        )


def _bytes_array(strings) -> np.ndarray:
    """Object array of UTF-8 bytes: the layout Triton BYTES tensors are built from cheaply."""
    encoded = [s.encode("utf-8") for s in strings]
    array = np.empty(len(encoded), dtype=object)
    array[:] = encoded
    return array
