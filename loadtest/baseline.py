"""The naive baseline a team would otherwise write: PyTorch eager BERT per request, then a
brute-force numpy dot product against every product embedding. Same model weights, same
catalog embeddings as the product, none of the serving work."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.index.store import CatalogIndex
from ecomsearch.paths import ModelRepositoryLayout


class NaivePipeline:
    def __init__(
        self, repository: Path, checkpoint: Path | None = None, device: str = "cpu"
    ) -> None:
        """`device`: where PyTorch runs the model ("cuda" for the GPU bench)."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ecomsearch.export.encoder import default_checkpoint

        checkpoint = checkpoint or default_checkpoint()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        self.device = device
        self.model = (
            AutoModel.from_pretrained(str(checkpoint), local_files_only=True).eval().to(device)
        )
        index = CatalogIndex.load(ModelRepositoryLayout(repository).index_dir)
        self.ids = index.ids
        self.embeddings = index.faiss_index.reconstruct_n(0, index.count)

    def search(
        self, queries: Sequence[str], k: int = contract.DEFAULT_TOP_K
    ) -> list[list[tuple[str, float]]]:
        torch = self.torch
        with torch.inference_mode():
            tokens = self.tokenizer(
                list(queries), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            states = self.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            query = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
        scores = query @ self.embeddings.T
        order = np.argsort(-scores, axis=1)[:, :k]
        return [
            [(self.ids[row].decode("utf-8"), float(s[row])) for row in rows]
            for rows, s in zip(order, scores, strict=True)
        ]
