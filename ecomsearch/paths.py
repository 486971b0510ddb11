"""Where things live: the one description of a model repository's layout, the files the package
ships (model repository template, demo catalogs, benchmark queries), and the default locations
of generated state.

Two ways to run: from a source checkout (`make serve`), where the checkout's `model_repository/`
is served and caches go to its `.cache/`; and from an installed package (`pip install
ecomsearch`), where the packaged template is copied to a per-user cache directory and everything
generated (exported encoder, indexes, embedding caches) lives there, never in site-packages.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ecomsearch import contract

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

# Environment overrides, for deployments and tests.
MODEL_REPOSITORY_ENV = "ECOMSEARCH_MODEL_REPOSITORY"
CACHE_DIR_ENV = "ECOMSEARCH_CACHE_DIR"

# Artefact names inside a model's version directory.
TOKENIZER_DIR = "tokenizer"
ENCODER_FILE = "model.onnx"
# The int8 twin of the encoder that `export-encoder` writes beside it: the CPU profile's model.
ENCODER_INT8_FILE = "model.int8.onnx"
ENCODER_INFO_FILE = "encoder.json"
CROSS_ENCODER_INFO_FILE = "cross_encoder.json"
ENCODER_ADAPTER_DIR = "adapter"
INDEX_DIR = "index"
RANKER_FILE = "model.onnx"
RANKER_INFO_FILE = "ranker.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
RANKER_TREE_FILE = "model.txt"
RANKER_MLP_FILE = "mlp.npz"
RECOMMENDER_INFO_FILE = "recommender.json"
# Left in a model repository made from the packaged template: the template's digest.
TEMPLATE_STAMP = ".template-sha256"
# Where a writer puts an artefact for a model that has no version directory yet.
FIRST_VERSION = 1


def version_numbers(model_dir: Path) -> list[int]:
    """The model's version directories, as Triton sees them (positive integer names)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name)
    )


def read_model_config(path: Path):
    """A config.pbtxt as Triton's ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


@dataclass(frozen=True)
class ModelRepositoryLayout:
    """Paths of the artefacts inside a model repository; the only place that names them.

    A model's artefacts are read from its latest version directory: the version an ensemble step
    with `model_version: -1` runs under Triton's default version policy (latest, one version).
    """

    root: Path

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def version_dir(self, model: str, version: int | None = None) -> Path:
        """`version`'s directory, by default the latest one (or the first, if there is none)."""
        if version is None:
            version = max(version_numbers(self.model_dir(model)), default=FIRST_VERSION)
        return self.model_dir(model) / str(version)

    def config_path(self, model: str, profile: str | None = None) -> Path:
        """The config Triton reads for `model` under `--model-config-name=profile`: the
        profile's `configs/<profile>.pbtxt` when the model has one, else `config.pbtxt`."""
        if profile is not None:
            path = self.model_dir(model) / "configs" / f"{profile}.pbtxt"
            if path.is_file():
                return path
        return self.model_dir(model) / "config.pbtxt"

    def served_model_file(self, model: str, profile: str | None = None) -> Path:
        """The file a profile serves for an ONNX model: its config's `default_model_filename`
        (Triton's rule; model.onnx when unset), in the latest version directory."""
        config = read_model_config(self.config_path(model, profile))
        return self.version_dir(model) / (config.default_model_filename or ENCODER_FILE)

    def config_files(self) -> list[Path]:
        """Every config Triton may read: each model's config.pbtxt and its profiles'
        configs/<profile>.pbtxt."""
        return sorted([*self.root.glob("*/config.pbtxt"), *self.root.glob("*/configs/*.pbtxt")])

    @classmethod
    def of_triton_model(cls, args: Mapping[str, str]) -> tuple[ModelRepositoryLayout, Path]:
        """From the `args` tritonserver passes to a Python model's initialize: the repository
        (`model_repository` is the model's own directory) and the served version's directory."""
        model_dir = Path(args["model_repository"])
        return cls(model_dir.parent), model_dir / str(args["model_version"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.version_dir(contract.PREPROCESS_MODEL) / TOKENIZER_DIR

    @property
    def encoder_version_dir(self) -> Path:
        return self.version_dir(contract.ENCODER_MODEL)

    @property
    def encoder_onnx(self) -> Path:
        return self.encoder_version_dir / ENCODER_FILE

    @property
    def encoder_int8_onnx(self) -> Path:
        return self.encoder_version_dir / ENCODER_INT8_FILE

    @property
    def encoder_info(self) -> Path:
        return self.encoder_version_dir / ENCODER_INFO_FILE

    @property
    def encoder_adapter_dir(self) -> Path:
        """The fine-tuned low-rank update of the encoder (`ecomsearch train-encoder`), checked
        in beside the encoder's versions and merged by `export-encoder`; Triton ignores it."""
        return self.model_dir(contract.ENCODER_MODEL) / ENCODER_ADAPTER_DIR

    @property
    def encoder_card(self) -> Path:
        return self.model_dir(contract.ENCODER_MODEL) / MODEL_CARD_FILE

    @property
    def cross_encoder_version_dir(self) -> Path:
        return self.version_dir(contract.CROSS_ENCODER_MODEL)

    @property
    def cross_encoder_onnx(self) -> Path:
        return self.cross_encoder_version_dir / ENCODER_FILE

    @property
    def cross_encoder_info(self) -> Path:
        return self.cross_encoder_version_dir / CROSS_ENCODER_INFO_FILE

    @property
    def cross_encoder_adapter_dir(self) -> Path:
        """The cross-encoder's low-rank update and scoring layer (`ecomsearch
        train-cross-encoder`), checked in; `export-cross-encoder` builds the graph from it."""
        return self.model_dir(contract.CROSS_ENCODER_MODEL) / ENCODER_ADAPTER_DIR

    @property
    def cross_encoder_card(self) -> Path:
        return self.model_dir(contract.CROSS_ENCODER_MODEL) / MODEL_CARD_FILE

    @property
    def index_dir(self) -> Path:
        """A relative symlink to the current versioned index directory beside it (hidden
        `.index.*` names, see ecomsearch.index.atomic), or a real directory written before
        versioned directories: read through it either way (`exists()`, `is_dir()` follow it)."""
        return self.version_dir(contract.RETRIEVE_MODEL) / INDEX_DIR

    @property
    def ranker_onnx(self) -> Path:
        return self.version_dir(contract.RANKER_MODEL) / RANKER_FILE

    @property
    def ranker_info(self) -> Path:
        return self.version_dir(contract.RANKER_MODEL) / RANKER_INFO_FILE

    @property
    def ranker_tree_model(self) -> Path:
        """The ranker in LightGBM's own format when it is trees (`model.onnx` is the same
        model for serving); `select` reads it to explain scores."""
        return self.version_dir(contract.RANKER_MODEL) / RANKER_TREE_FILE

    @property
    def ranker_mlp_weights(self) -> Path:
        """The MLP ranker's weights as arrays (`model.onnx` is the same network for serving);
        `select` reads them to explain scores."""
        return self.version_dir(contract.RANKER_MODEL) / RANKER_MLP_FILE

    @property
    def ranker_card(self) -> Path:
        return self.model_dir(contract.RANKER_MODEL) / MODEL_CARD_FILE

    @property
    def recommend_ranker_onnx(self) -> Path:
        return self.version_dir(contract.RECOMMEND_RANKER_MODEL) / RANKER_FILE

    @property
    def recommender_info(self) -> Path:
        """What `train-recommender` recorded: the ranker's features and export checks, and the
        settings the candidate models read (the tuned `similar` blend)."""
        return self.version_dir(contract.RECOMMEND_RANKER_MODEL) / RECOMMENDER_INFO_FILE

    @property
    def recommend_ranker_card(self) -> Path:
        return self.model_dir(contract.RECOMMEND_RANKER_MODEL) / MODEL_CARD_FILE

    @property
    def catalog_store_path(self) -> Path:
        """The default catalog store, a SQLite file in the data directory beside the repository
        (`var/`), named after it: outside the repository, so tritonserver never sees it, and
        one per repository, so evaluation workspaces do not share a catalog."""
        return self.root.parent / "var" / f"{self.root.name}.catalog.sqlite3"

    def generated(self) -> list[Path]:
        """Artefacts made by export-encoder, export-cross-encoder and build-index (never
        checked in or packaged)."""
        return [
            self.encoder_onnx,
            self.encoder_int8_onnx,
            self.encoder_info,
            self.tokenizer_dir,
            self.cross_encoder_onnx,
            self.cross_encoder_info,
            self.index_dir,
        ]


# --- What the package ships -------------------------------------------------------------------


def source_checkout() -> Path | None:
    """The project's root when this package runs from a source tree (an editable install)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "model_repository").is_dir():
        return root
    return None


def _on_disk(resource: Traversable) -> Path:
    # Wheels install unzipped, so package resources are real files; say so if they are not.
    if not isinstance(resource, Path):
        raise RuntimeError(f"ecomsearch is installed in a way that hides its files ({resource})")
    return resource


def _packaged(relative: str) -> Path:
    """A file or directory the project ships: from the source tree, or from the installed
    package, where pyproject.toml puts the top-level directories inside `ecomsearch/`."""
    checkout = source_checkout()
    if checkout is not None:
        return checkout / relative
    return _on_disk(importlib.resources.files("ecomsearch").joinpath(relative))


def template_repository() -> Path:
    """The checked-in model repository: configs, model.py adapters and the trained ranker."""
    return _packaged("model_repository")


def demo_catalog(full: bool = False) -> Path:
    """The PC-parts demo catalog (MIT): 16,154 priced products, or all 63,827 with `full`."""
    name = "products.jsonl.gz" if full else "products_priced.jsonl.gz"
    return _packaged(f"data/pc_parts/{name}")


def default_queries() -> Path:
    """Real-looking product queries for benchmarks and load tests, one a line."""
    return _on_disk(importlib.resources.files("ecomsearch.loadtest").joinpath("queries.txt"))


# --- Generated state ----------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """The per-user cache directory (XDG), for an installed package's generated state."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ecomsearch"


def default_cache_dir() -> Path:
    """Embedding caches and generated workspaces: `$ECOMSEARCH_CACHE_DIR`, else the checkout's
    `.cache/` (git-ignored), else the per-user cache directory."""
    if CACHE_DIR_ENV in os.environ:
        return Path(os.environ[CACHE_DIR_ENV])
    checkout = source_checkout()
    return checkout / ".cache" if checkout is not None else user_cache_dir()


def default_model_repository() -> Path:
    """`$ECOMSEARCH_MODEL_REPOSITORY`, else the checkout's `model_repository/`, else a copy of
    the packaged template in the per-user cache directory."""
    if MODEL_REPOSITORY_ENV in os.environ:
        return Path(os.environ[MODEL_REPOSITORY_ENV])
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "model_repository"
    return user_cache_dir() / "model_repository"


def _template_files(template: Path) -> Iterator[Path]:
    """The template's own files: in a source checkout, what is checked in, not what
    export-encoder and build-index generated there (or their hidden scratch files)."""
    generated = ModelRepositoryLayout(template).generated()
    for path in sorted(template.rglob("*")):
        relative = path.relative_to(template)
        if (
            path.is_file()
            and "__pycache__" not in relative.parts
            and not any(part.startswith(".") and part != ".gitkeep" for part in relative.parts)
            and not any(path == g or g in path.parents for g in generated)
        ):
            yield path


def prepare_model_repository(target: Path) -> Path:
    """Makes `target` hold the packaged template's files, keeping whatever was generated there.

    Only a repository this function made (it leaves a stamp) or a new one is touched: it gets the
    template's files when they are missing or the template changed (say, after an upgrade). A
    source checkout's model_repository/, or any other repository someone laid out, is left as it
    is."""
    template = template_repository()
    target = Path(target)
    stamp = target / TEMPLATE_STAMP
    if target.exists() and target.resolve() == template.resolve():
        return target
    if not stamp.is_file() and any(target.glob("*/config.pbtxt")):
        return target
    files = list(_template_files(template))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(template)).encode() + b"\0" + path.read_bytes())
    if stamp.is_file() and stamp.read_text().strip() == digest.hexdigest():
        return target
    log.info("model repository %s: installing the packaged configs and ranker", target)
    for path in files:
        destination = target / path.relative_to(template)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    stamp.write_text(digest.hexdigest() + "\n")
    return target
