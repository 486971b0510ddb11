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
from ecomsearch.encoder import row_cosines
from ecomsearch.export.int8 import (
    DEFAULT_SMOOTHING_ALPHA,
    DEFAULT_WEIGHT_BITS,
    QuantizedGraph,
    quantize_per_token,
)
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
# The int8 graph's smoothing is calibrated on random token ids (export/int8.py says why), with
# seeds of their own: neither the traced nor the checked inputs.
CALIBRATION_BATCH, CALIBRATION_SEQUENCE = 8, 16
CALIBRATION_SEEDS = range(100, 108)
# float32 BERT through ORT's fused kernels differs from eager PyTorch by ~1e-6 on unit vectors.
ATOL = 1e-4
# int8 moves values, not directions: each quantized embedding must stay this close to fp32's
# (measured: 0.997 at worst on the check inputs' random token ids, 0.997 at worst and 0.998 on
# average over the demo's real queries).
INT8_MIN_COSINE = 0.99
# A row alone and the same row in a batch: every token has its own scale, but kernels may tile
# rows differently and sum in another order (measured: cosine 1.0 within float32 rounding).
# Per-batch activation scales, which this rules out, gave 0.987.
ROW_INDEPENDENCE_MIN_COSINE = 0.99999

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
    onnx_path: Path  # float32: the GPU profile's model and the one the index is built with
    int8_onnx_path: Path  # the CPU profile's model (its config's default_model_filename)
    fingerprint: str  # of the float32 model
    dimension: int
    max_abs_difference: float
    int8_min_cosine: float  # the int8 graph against PyTorch, at the checked shape
    seconds: float


def quantize_int8(source: Path, target: Path, vocab_size: int) -> QuantizedGraph:
    """The CPU profile's encoder: per-token int8 in standard operators, smoothed
    (`ecomsearch.export.int8`). Each token's activations get their own scale, so a query's
    embedding is the same in any batch (validate_rows_independent checks it)."""
    import onnx

    calibration = [
        sample_inputs(CALIBRATION_BATCH, CALIBRATION_SEQUENCE, vocab_size, seed)
        for seed in CALIBRATION_SEEDS
    ]
    quantized = quantize_per_token(onnx.load(str(source)), calibration=calibration)
    onnx.save(quantized.model, str(target))
    return quantized


def validate_rows_independent(onnx_path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Each row's embedding alone must point where its embedding within the batch points:
    Triton batches unrelated queries together, and none may move another's results. Returns
    the smallest cosine; raises ExportValidationError below ROW_INDEPENDENCE_MIN_COSINE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (batched,) = session.run([contract.EMBEDDING], inputs)
    alone = np.concatenate(
        [
            session.run(
                [contract.EMBEDDING], {name: value[row : row + 1] for name, value in inputs.items()}
            )[0]
            for row in range(len(batched))
        ]
    )
    cosine = float(np.min(row_cosines(alone, batched)))
    if not cosine >= ROW_INDEPENDENCE_MIN_COSINE:
        raise ExportValidationError(
            f"{onnx_path.name}: a row's embedding depends on the other rows of its batch "
            f"(cosine {cosine:.6f} < {ROW_INDEPENDENCE_MIN_COSINE})"
        )
    return cosine


def export_encoder(
    checkpoint: Path,
    layout: ModelRepositoryLayout,
    adapter_dir: Path | None = None,
) -> EncoderExport:
    """Exports and validates the float32 graph, quantizes it to int8 and validates that too,
    then moves both models and the tokenizer into the repository. Each profile's config picks
    its file (`default_model_filename`): int8 for the CPU profile, float32 for the GPU one
    (which TensorRT runs in float16). `adapter_dir` holds a fine-tuned low-rank update
    (`ecomsearch train-encoder`), merged before tracing."""
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
        int8 = export.onnx_path.with_name(layout.encoder_int8_onnx.name)
        quantized = quantize_int8(export.onnx_path, int8, vocab_size)
        min_cosine = validate_embedding_agreement(module, int8, checked, INT8_MIN_COSINE)
        row_cosine = validate_rows_independent(int8, checked)
        # int8 first: a reader that sees the new float32 model finds its int8 twin beside it.
        install(int8, layout.encoder_int8_onnx)
        install(export.onnx_path, layout.encoder_onnx)
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
        "int8": {
            "file": layout.encoder_int8_onnx.name,
            "fingerprint": file_sha256(layout.encoder_int8_onnx),
            "quantization": (
                f"per-token int8 (MatMulInteger): u8 activations with one scale per token, "
                f"{DEFAULT_WEIGHT_BITS}-bit weights with one scale per output column, "
                f"{quantized.matmuls} MatMuls over {quantized.activations} quantized activations, "
                f"{quantized.smoothed} of them smoothed (alpha {DEFAULT_SMOOTHING_ALPHA}, "
                f"calibrated on {len(CALIBRATION_SEEDS)} x {CALIBRATION_BATCH} random sequences "
                f"of {CALIBRATION_SEQUENCE} tokens)"
            ),
            "min_cosine_to_pytorch": min_cosine,
            "min_cosine_alone_to_batched": row_cosine,
            "required_min_cosine": INT8_MIN_COSINE,
        },
        "adapter": adapter,
    }
    layout.encoder_info.write_text(json.dumps(info, indent=2) + "\n")
    return EncoderExport(
        onnx_path=layout.encoder_onnx,
        int8_onnx_path=layout.encoder_int8_onnx,
        fingerprint=fingerprint,
        dimension=dimension,
        max_abs_difference=difference,
        int8_min_cosine=min_cosine,
        seconds=time.perf_counter() - started,
    )


__all__ = ["EncoderExport", "ExportValidationError", "default_checkpoint", "export_encoder"]
