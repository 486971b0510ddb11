"""Where things live: the model repository layout and the project's default locations."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ecomsearch import contract

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_CATALOG = PROJECT_ROOT / "data" / "pc_parts" / "products_priced.jsonl.gz"
DEMO_CATALOG_FULL = PROJECT_ROOT / "data" / "pc_parts" / "products.jsonl.gz"


def default_model_repository() -> Path:
    return Path(os.environ.get("ECOMSEARCH_MODEL_REPOSITORY", PROJECT_ROOT / "model_repository"))


def default_cache_dir() -> Path:
    """Embedding cache and other regenerable state (git-ignored)."""
    return Path(os.environ.get("ECOMSEARCH_CACHE_DIR", PROJECT_ROOT / ".cache"))


@dataclass(frozen=True)
class ModelRepositoryLayout:
    """Paths of the generated artefacts inside a model repository."""

    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / contract.PREPROCESS_MODEL / "1" / "tokenizer"

    @property
    def encoder_version_dir(self) -> Path:
        return self.root / contract.ENCODER_MODEL / "1"

    @property
    def encoder_onnx(self) -> Path:
        return self.encoder_version_dir / "model.onnx"

    @property
    def encoder_info(self) -> Path:
        return self.encoder_version_dir / "encoder.json"

    @property
    def index_dir(self) -> Path:
        return self.root / contract.RETRIEVE_MODEL / "1" / "index"

    @property
    def ranker_dir(self) -> Path:
        return self.root / contract.RANKER_MODEL

    @property
    def ranker_onnx(self) -> Path:
        return self.ranker_dir / "1" / "model.onnx"

    @property
    def ranker_info(self) -> Path:
        return self.ranker_dir / "1" / "ranker.json"

    @property
    def ranker_card(self) -> Path:
        return self.ranker_dir / "MODEL_CARD.md"

    def generated(self) -> list[Path]:
        """Artefacts made by export-encoder and build-index (not checked in)."""
        return [self.encoder_onnx, self.encoder_info, self.tokenizer_dir, self.index_dir]
