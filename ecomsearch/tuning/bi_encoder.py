"""`ecomsearch train-encoder`: contrastive fine-tuning of the bi-encoder on graded judgments.

Each step takes a batch of distinct training queries, one relevant product of each (drawn in
proportion to its gain) and one hard negative of each, and minimises InfoNCE: every query must
pick out its own product among all the batch's products (in-batch negatives) and hard negatives.
Hard negatives are mined from the current retrieval (the served hybrid stage): products it ranks
high for the query that the judges graded irrelevant, or that nobody judged. Unjudged products
just below the top are skipped (MINE_SKIP): on a real catalog many of them are relevant, and
training against them would push the encoder away from right answers.

Only low-rank adapters train (ecomsearch.tuning.lora), the public weights stay frozen, and the
result is saved as the adapter the export merges. Validation queries are never seen.
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

log = logging.getLogger(__name__)

# InfoNCE scale (1 / temperature) of the Sentence-Transformers multiple-negatives loss, which
# all-MiniLM-L6-v2 itself was trained with.
SCALE = 20.0
# Mined negatives: the retrieval's top MINE_DEPTH candidates, skipping the first MINE_SKIP
# unjudged ones (likely relevant, unjudged only because nobody asked).
MINE_DEPTH = 50
MINE_SKIP = 10
NEGATIVES_PER_QUERY = 8
TRAIN_PRODUCT_TOKENS = 64  # titles and the start of descriptions: all a query can match


@dataclass(frozen=True)
class EncoderTrainingSettings:
    epochs: int = 2
    batch_queries: int = 64
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 13
    threads: int = 0  # 0: PyTorch's default (all cores)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TrainingQuery:
    query: str
    positives: tuple[str, ...]  # product ids, judged relevant
    positive_weights: tuple[float, ...]  # their gains, the sampling weights
    negatives: tuple[str, ...]  # product ids: judged irrelevant, or mined


def judged_examples(
    queries: Sequence[str], judgments: Judgments, known: set[str]
) -> list[TrainingQuery]:
    """Each query with a relevant product in the catalog, with its relevant products and the
    ones judged irrelevant (the first hard negatives: products a shop's search really showed)."""
    examples = []
    for query in queries:
        gains = {pid: g for pid, g in judgments.gains(query).items() if pid in known}
        positives = sorted(pid for pid, g in gains.items() if g >= judgments.relevant_gain)
        if not positives:
            continue
        negatives = sorted(pid for pid, g in gains.items() if g < judgments.relevant_gain)
        examples.append(
            TrainingQuery(
                query, tuple(positives), tuple(gains[p] for p in positives), tuple(negatives)
            )
        )
    return examples


def add_mined_negatives(
    examples: Sequence[TrainingQuery],
    ranked_ids: Mapping[str, Sequence[str]],
    judgments: Judgments,
    per_query: int = NEGATIVES_PER_QUERY,
    skip: int = MINE_SKIP,
) -> list[TrainingQuery]:
    """Tops each query's negatives up to `per_query` from its retrieval ranking (`ranked_ids`,
    best first): judged-irrelevant products come first whatever their rank, then unjudged
    products after the first `skip` unjudged ones. Judged-relevant products are never negatives."""
    result = []
    for example in examples:
        judged = judgments.grades.get(example.query, {})
        negatives = list(example.negatives)
        unjudged_seen = 0
        for pid in ranked_ids.get(example.query, ()):
            if len(negatives) >= per_query:
                break
            if pid in judged:
                continue  # relevant (never a negative) or already a judged negative
            unjudged_seen += 1
            if unjudged_seen > skip:
                negatives.append(pid)
        result.append(
            TrainingQuery(
                example.query,
                example.positives,
                example.positive_weights,
                tuple(dict.fromkeys(negatives)),
            )
        )
    return result


@dataclass
class EncoderTrainingReport:
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    with_negatives: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _batches(count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(count)
    return [order[i : i + size] for i in range(0, count, size) if len(order[i : i + size]) > 1]


def train_adapter(
    checkpoint: Path,
    examples: Sequence[TrainingQuery],
    product_texts: Mapping[str, str],
    settings: EncoderTrainingSettings,
    adapter_config,
    progress: bool = True,
):
    """Returns (the SentenceEncoder with trained adapters, in eval mode, EncoderTrainingReport).
    Deterministic for a given seed and thread count."""
    import torch

    from ecomsearch.text import TextTokenizer
    from ecomsearch.tuning.lora import add_adapters
    from ecomsearch.tuning.sentence_encoder import build_sentence_encoder

    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build_sentence_encoder(checkpoint)
    add_adapters(model.transformer, adapter_config, seed=settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    query_tokens = TextTokenizer(checkpoint, max_length=contract.MAX_QUERY_TOKENS)
    product_tokens = TextTokenizer(checkpoint, max_length=TRAIN_PRODUCT_TOKENS)
    epochs = [_batches(len(examples), settings.batch_queries, rng) for _ in range(settings.epochs)]
    total_steps = sum(len(e) for e in epochs)
    warmup = max(1, int(total_steps * settings.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup))
        ),
    )
    relevant_of = {e.query: set(e.positives) for e in examples}

    def embed(tokenizer, texts: Sequence[str]) -> torch.Tensor:
        input_ids, attention_mask = tokenizer(texts)
        return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))

    report = EncoderTrainingReport(
        examples=len(examples), with_negatives=sum(bool(e.negatives) for e in examples)
    )
    model.train()
    step_iter = ((epoch, batch) for epoch, batches in enumerate(epochs) for batch in batches)
    if progress:
        from tqdm import tqdm

        step_iter = tqdm(step_iter, total=total_steps, desc="train-encoder", unit="step")
    losses: list[float] = []
    for epoch, batch in step_iter:
        chosen = [examples[i] for i in batch]
        positives = [
            e.positives[
                rng.choice(
                    len(e.positives), p=np.divide(e.positive_weights, sum(e.positive_weights))
                )
            ]
            for e in chosen
        ]
        negatives = [e.negatives[rng.integers(len(e.negatives))] for e in chosen if e.negatives]
        candidates = positives + negatives
        queries = embed(query_tokens, [e.query for e in chosen])
        products = embed(product_tokens, [product_texts[pid] for pid in candidates])
        logits = SCALE * queries @ products.T
        # Another query's product that this query's judges also called relevant is not a
        # negative for it: mask it rather than teach the model to push it away.
        also_relevant = torch.tensor(
            [
                [j != i and pid in relevant_of[e.query] for j, pid in enumerate(candidates)]
                for i, e in enumerate(chosen)
            ]
        )
        logits = logits.masked_fill(also_relevant, -1e4)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(chosen)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        report.steps += 1
        losses.append(float(loss.detach()))
        if report.steps % 50 == 0 or report.steps == total_steps:
            report.history.append(
                {"step": report.steps, "epoch": epoch + 1, "loss": float(np.mean(losses[-50:]))}
            )
            log.info("step %d/%d: loss %.4f", report.steps, total_steps, np.mean(losses[-50:]))
    model.eval()
    report.seconds = time.perf_counter() - started
    return model, report


# Writes the merged encoder into a model repository through the verified ONNX export
# (ecomsearch.export.encoder) and returns what it recorded; passed in by the caller, so
# training does not depend on the export tooling.
EncoderExporter = Callable[[Path], dict[str, Any]]


def retrieval_rankings(
    queries: Sequence[str], encoder, retriever, ids: Mapping[int, bytes], batch: int = 64
) -> dict[str, list[str]]:
    """query -> the served retrieval stage's candidates, best first (its own fused order)."""
    from ecomsearch.ranking.selection import top_k_rows

    rankings: dict[str, list[str]] = {}
    for start in range(0, len(queries), batch):
        chunk = list(queries[start : start + batch])
        candidates = retriever.retrieve(chunk, encoder.encode(chunk, batch_size=batch))
        rows, _ = top_k_rows(candidates.rows, candidates.retrieval_scores, MINE_DEPTH)
        for query, query_rows in zip(chunk, rows, strict=True):
            rankings[query] = [ids[row].decode("utf-8") for row in query_rows if row >= 0]
    return rankings


@dataclass(frozen=True)
class MinedTrainingSet:
    """The training split's judged queries with their mined negatives, and what produced them:
    what train-encoder and train-cross-encoder both learn from."""

    judgments: Judgments
    examples: list[TrainingQuery]
    validation_queries: list[str]
    products: dict[str, Any]  # id -> ecomsearch.catalog.Product
    seed: int
    validation_fraction: float
    mined_with_encoder: str
    mining_s: float

    def record(self, catalog: Path, judgments_path: Path, data_description: str) -> dict:
        """What a model card and adapter.json say of the data."""
        return {
            "training_data": {
                "catalog": str(catalog),
                "judgments": str(judgments_path),
                "description": data_description,
                "split": {"seed": self.seed, "validation_fraction": self.validation_fraction},
            },
            "mined_with_encoder": self.mined_with_encoder,
            "mining": {
                "depth": MINE_DEPTH,
                "skip_unjudged": MINE_SKIP,
                "seconds": round(self.mining_s, 1),
            },
        }


def mined_training_set(
    catalog: Path,
    judgments_path: Path,
    layout,
    cache_dir: Path,
    seed: int | None = None,
    validation_fraction: float | None = None,
) -> MinedTrainingSet:
    """The training split of the judgments (the split train-ranker and eval share), each query
    with its judged products and negatives mined by the current served retrieval over
    `catalog`."""
    from ecomsearch.catalog import iter_catalog
    from ecomsearch.evaluation.metrics import read_judgments
    from ecomsearch.evaluation.splits import (
        DEFAULT_SEED,
        DEFAULT_VALIDATION_FRACTION,
        split_queries,
    )
    from ecomsearch.ranking.candidates import catalog_retrieval

    seed = DEFAULT_SEED if seed is None else seed
    validation_fraction = (
        DEFAULT_VALIDATION_FRACTION if validation_fraction is None else validation_fraction
    )
    judgments = read_judgments(judgments_path)
    train_queries, validation_queries = split_queries(
        judgments.evaluable_queries(), seed, validation_fraction
    )
    products = {p.id: p for p in iter_catalog(catalog)}
    examples = judged_examples(train_queries, judgments, set(products))
    served = catalog_retrieval(catalog, cache_dir, layout.root)
    mined_at = time.perf_counter()
    rankings = retrieval_rankings(
        [e.query for e in examples], served.encoder, served.retriever, served.ids
    )
    examples = add_mined_negatives(examples, rankings, judgments)
    mining_s = time.perf_counter() - mined_at
    log.info(
        "%d training queries (%d validation queries never seen); negatives mined in %.0f s",
        len(examples),
        len(validation_queries),
        mining_s,
    )
    return MinedTrainingSet(
        judgments,
        examples,
        list(validation_queries),
        products,
        seed,
        validation_fraction,
        served.encoder.fingerprint,
        mining_s,
    )


@dataclass(frozen=True)
class TrainEncoderResult:
    report: EncoderTrainingReport
    counts: dict[str, int]
    export: dict[str, Any]


def train_encoder_and_export(
    catalog: Path,
    judgments_path: Path,
    layout,
    cache_dir: Path,
    export: EncoderExporter,
    checkpoint: Path | None = None,
    settings: EncoderTrainingSettings | None = None,
    adapter_config=None,
    data_description: str = "",
    seed: int | None = None,
    validation_fraction: float | None = None,
) -> TrainEncoderResult:
    """The whole command: mine negatives with the current served encoder, train the adapter on
    the training split only, save it to the repository's adapter directory and export."""
    from datetime import datetime, timezone

    from ecomsearch.catalog import product_text
    from ecomsearch.tuning.card import write_encoder_card
    from ecomsearch.tuning.lora import AdapterConfig, adapter_weights, save_adapter
    from ecomsearch.tuning.sentence_encoder import default_checkpoint

    settings = settings or EncoderTrainingSettings()
    adapter_config = adapter_config or AdapterConfig()
    checkpoint = checkpoint or default_checkpoint()
    mined = mined_training_set(
        catalog, judgments_path, layout, cache_dir, seed, validation_fraction
    )
    examples = mined.examples
    texts = {pid: product_text(p) for pid, p in mined.products.items()}

    model, report = train_adapter(checkpoint, examples, texts, settings, adapter_config)
    counts = {
        "training_queries": len(examples),
        "training_queries_with_negatives": report.with_negatives,
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
        "training_seconds": round(report.seconds, 1),
        "history": report.history,
    }
    save_adapter(
        layout.encoder_adapter_dir, adapter_weights(model.transformer), adapter_config, info
    )
    write_encoder_card(layout.encoder_card, {"adapter": adapter_config.as_dict(), **info})
    record = export(layout.encoder_adapter_dir)
    return TrainEncoderResult(report, counts, record)
