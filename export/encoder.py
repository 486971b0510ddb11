"""`ecomsearch export-encoder`: a Hugging Face bi-encoder to a tokenizer-free ONNX graph.

The graph takes `input_ids` and `attention_mask` and returns the L2-normalised mean-pooled
sentence embedding, so the served model and the index builder compute exactly the same vector.
The tokenizer files go to the preprocess model, which turns query text into ids.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecomsearch import contract
from ecomsearch.export.onnx import (
    OPSET,
    ExportValidationError,
    OnnxSignature,
    install,
    validate_embedding_agreement,
    verified_export,
)
from ecomsearch.fingerprint import file_sha256
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.tuning.lora import ADAPTER_FILE, load_adapter, merge_adapter
from ecomsearch.tuning.sentence_encoder import build_sentence_encoder, default_checkpoint

log = logging.getLogger(__name__)

TOKEN_AXES = {0: "batch", 1: "sequence"}
# Traced with one shape, validated with another, so the dynamic axes are really dynamic.
TRACE_BATCH, TRACE_SEQUENCE = 2, 8
CHECK_BATCH, CHECK_SEQUENCE = 3, 21
# float32 BERT through ORT's fused kernels differs from eager PyTorch by ~1e-6 on unit vectors.
ATOL = 1e-4
QUANTIZATIONS = ("none", "int8")
# int8 moves values, not directions: each quantized embedding must stay this close to fp32's.
INT8_MIN_COSINE = 0.97

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def sample_inputs(batch: int, sequence: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids with ragged padding, so masking is exercised."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1000, vocab_size, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.ones((batch, sequence), dtype=np.int64)
    for row in range(1, batch):
        length = max(2, sequence - 3 * row)
        attention_mask[row, length:] = 0
        input_ids[row, length:] = 0
    return {contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask}


@dataclass(frozen=True)
class EncoderExport:
    onnx_path: Path
    fingerprint: str
    dimension: int
    max_abs_difference: float
    seconds: float


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized on the fly.
    Per-channel weights keep the embedding direction closer to fp32 than per-tensor ones."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def export_encoder(
    checkpoint: Path,
    layout: ModelRepositoryLayout,
    quantize: str = "none",
    adapter_dir: Path | None = None,
) -> EncoderExport:
    """Exports, validates, optionally quantizes (and validates again), then moves the model and
    tokenizer into the repository. `adapter_dir` holds a fine-tuned low-rank update
    (`ecomsearch train-encoder`), merged into the checkpoint's weights before tracing."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    missing = [
        name for name in ("config.json", "tokenizer.json") if not (checkpoint / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint} lacks {', '.join(missing)}")
    module = build_sentence_encoder(checkpoint)
    adapter = None
    if adapter_dir is not None:
        config, weights, _ = load_adapter(adapter_dir)
        layers = merge_adapter(module.transformer, config, weights)
        adapter = {
            "directory": str(adapter_dir),
            "sha256": file_sha256(adapter_dir / ADAPTER_FILE),
            "layers": layers,
            **config.as_dict(),
        }
        log.info(
            "merged the rank-%d adapter of %d layers from %s", config.rank, layers, adapter_dir
        )
    vocab_size = int(module.transformer.config.vocab_size)
    dimension = int(module.transformer.config.hidden_size)
    signature = OnnxSignature(
        inputs={contract.INPUT_IDS: TOKEN_AXES, contract.ATTENTION_MASK: TOKEN_AXES},
        # The tracer leaves the embedding width symbolic; declare it, as the config does.
        outputs={contract.EMBEDDING: {0: "batch", 1: dimension}},
    )
    traced = sample_inputs(TRACE_BATCH, TRACE_SEQUENCE, vocab_size, seed=0)
    checked = sample_inputs(CHECK_BATCH, CHECK_SEQUENCE, vocab_size, seed=1)
    with verified_export(module, signature, traced, checked, atol=ATOL) as export:
        min_cosine = None
        served = export.onnx_path
        if quantize == "int8":
            served = export.onnx_path.with_name("model.int8.onnx")
            quantize_int8(export.onnx_path, served)
            min_cosine = validate_embedding_agreement(module, served, checked, INT8_MIN_COSINE)
        install(served, layout.encoder_onnx)
    difference = export.max_abs_differences[contract.EMBEDDING]

    layout.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, layout.tokenizer_dir / name)

    fingerprint = file_sha256(layout.encoder_onnx)
    info = {
        "source_checkpoint": str(checkpoint),
        "fingerprint": fingerprint,
        "dimension": dimension,
        "opset": OPSET,
        "validated_at": {"batch": CHECK_BATCH, "sequence": CHECK_SEQUENCE},
        "max_abs_difference": difference,
        "atol": ATOL,
        "quantization": quantize,
        "int8_min_cosine_to_pytorch": min_cosine,
        "adapter": adapter,
    }
    layout.encoder_info.write_text(json.dumps(info, indent=2) + "\n")
    return EncoderExport(
        onnx_path=layout.encoder_onnx,
        fingerprint=fingerprint,
        dimension=dimension,
        max_abs_difference=difference,
        seconds=time.perf_counter() - started,
    )


__all__ = ["EncoderExport", "ExportValidationError", "default_checkpoint", "export_encoder"]
