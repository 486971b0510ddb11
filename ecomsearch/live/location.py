"""Which catalog store a model repository serves."""

from __future__ import annotations

import os

from ecomsearch.index.manifest import IndexManifest
from ecomsearch.paths import ModelRepositoryLayout

# Where the served catalog store is, for deployments whose store URL carries credentials (a
# Secret) or differs from where the index was built: `ecomsearch serve --store` sets it.
STORE_URL_ENV = "ECOMSEARCH_STORE_URL"
# The write key the `catalog` model requires of every write, when set.
WRITE_KEY_ENV = "ECOMSEARCH_WRITE_KEY"


def served_store_url(
    layout: ModelRepositoryLayout, manifest: IndexManifest | None = None
) -> str | None:
    """`$ECOMSEARCH_STORE_URL`, else the store the served index was built from (its manifest
    records it without a password); None for an index built without a store."""
    if os.environ.get(STORE_URL_ENV):
        return os.environ[STORE_URL_ENV]
    manifest = manifest or IndexManifest.read(layout.index_dir)
    return manifest.catalog_store
