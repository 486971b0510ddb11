"""`ecomsearch train-ranker`: candidates and features from the serving code, graded judgments as
labels, a listwise loss, early stopping on queries held out of training."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ecomsearch import contract
from ecomsearch.encoder import OnnxEncoder
from ecomsearch.evaluation.metrics import Judgments, Metrics, dcg, evaluate
from ecomsearch.evaluation.splits import DEFAULT_SEED, DEFAULT_VALIDATION_FRACTION, split_queries
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.candidates import HybridRetriever, catalog_retrieval
from ecomsearch.ranking.selection import best_positions, top_k_rows

log = logging.getLogger(__name__)

ENCODE_BATCH = 64


@dataclass
class ExampleSet:
    """Candidates of many queries, stacked: the training and evaluation tensors."""

    queries: list[str]
    rows: np.ndarray  # [n, width] int64, -1 pads
    features: np.ndarray  # [n, width, F] float32
    retrieval_scores: np.ndarray  # [n, width] float32
    gains: np.ndarray  # [n, width] float32, 0 for unjudged and padding
    ideal_dcg: np.ndarray  # [n] from all judged products, not only the retrieved ones

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0

    def subset(self, mask: np.ndarray) -> ExampleSet:
        return ExampleSet(
            [q for q, keep in zip(self.queries, mask, strict=True) if keep],
            self.rows[mask],
            self.features[mask],
            self.retrieval_scores[mask],
            self.gains[mask],
            self.ideal_dcg[mask],
        )


def build_examples(
    queries: Sequence[str],
    judgments: Judgments,
    encoder: OnnxEncoder,
    retriever: HybridRetriever,
    ids: Mapping[int, bytes],
    progress: bool = True,
) -> ExampleSet:
    """Runs the serving pipeline's candidate stage in-process for each query."""
    parts = []
    batches = range(0, len(queries), ENCODE_BATCH)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="candidates", unit="batch")
    for start in batches:
        chunk = list(queries[start : start + ENCODE_BATCH])
        embeddings = encoder.encode(chunk, batch_size=ENCODE_BATCH)
        parts.append(retriever.retrieve(chunk, embeddings))
    rows = np.concatenate([p.rows for p in parts])
    gains = np.zeros(rows.shape, dtype=np.float32)
    ideal = np.zeros(len(queries), dtype=np.float64)
    for i, query in enumerate(queries):
        query_gains = judgments.gains(query)
        ideal[i] = dcg(sorted(query_gains.values(), reverse=True)[:10])
        for j, row in enumerate(rows[i]):
            if row >= 0:
                gains[i, j] = query_gains.get(ids[row].decode("utf-8"), 0.0)
    return ExampleSet(
        list(queries),
        rows,
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.retrieval_scores for p in parts]),
        gains,
        ideal,
    )


# (queries, titles) -> the teacher's P(relevant) of each pair (ecomsearch.tuning.cross_encoder).
Teacher = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def with_teacher_gains(
    examples: ExampleSet,
    judgments: Judgments,
    titles: Mapping[int, tuple[str, str]],
    teacher: Teacher,
    depth: int,
    weight: float,
) -> tuple[ExampleSet, int]:
    """Distillation: each query's unjudged candidates among its `depth` best by retrieval
    score get a gain of `weight` x the teacher's P(relevant) x the top gain, instead of 0.
    Judged candidates keep their judges' gains. `titles`: row -> (product id, title).
    Returns the relabelled set and the number of pairs the teacher scored."""
    top_gain = judgments.highest - judgments.lowest
    best = best_positions(examples.retrieval_scores, examples.valid, depth)
    picked_rows = np.take_along_axis(examples.rows, best, axis=1)
    judged = [set(judgments.gains(q)) for q in examples.queries]
    where, queries, texts = [], [], []
    for i, query in enumerate(examples.queries):
        for position, row in zip(best[i], picked_rows[i], strict=True):
            if row >= 0 and titles[row][0] not in judged[i]:
                where.append((i, position))
                queries.append(query)
                texts.append(titles[row][1])
    gains = examples.gains.copy()
    if where:
        probabilities = teacher(queries, texts)
        query_index, position = np.array(where).T
        gains[query_index, position] = np.float32(weight * top_gain) * probabilities
    relabelled = ExampleSet(
        examples.queries,
        examples.rows,
        examples.features,
        examples.retrieval_scores,
        gains,
        examples.ideal_dcg,
    )
    return relabelled, len(where)


def ndcg_at_10(scores: np.ndarray, examples: ExampleSet) -> float:
    """Mean NDCG@10 of ordering each query's candidates by `scores`, as `select` orders them."""
    top = best_positions(scores, examples.valid, 10)
    top_gains = np.take_along_axis(examples.gains, top, axis=1)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    dcgs = (top_gains * discounts[: top.shape[1]]).sum(axis=1)
    return float(np.mean(np.where(examples.ideal_dcg > 0, dcgs / examples.ideal_dcg, 0.0)))


def served_rankings(
    scores: np.ndarray, examples: ExampleSet, ids: Mapping[int, bytes], k: int
) -> dict[str, list[str]]:
    """query -> top-k product ids, as the `select` model returns them."""
    rows, _ = top_k_rows(examples.rows, scores, k)
    return {
        query: [ids[row].decode("utf-8") for row in query_rows if row >= 0]
        for query, query_rows in zip(examples.queries, rows, strict=True)
    }


@dataclass
class TrainingReport:
    epochs_run: int
    best_epoch: int
    best_early_stop_ndcg: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    train_set: ExampleSet,
    early_stop_set: ExampleSet,
    seed: int,
    max_epochs: int = 60,
    patience: int = 8,
    queries_per_step: int = 32,
    learning_rate: float = 2e-3,
    relevant_gain: float | None = None,
    recall_weight: float = 0.0,
):
    """Returns (ranker in eval mode, TrainingReport). Deterministic for a given seed."""
    import torch

    from ecomsearch.ranking.model import Ranker, listnet_loss

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    valid_features = train_set.features[train_set.valid]
    model = Ranker(valid_features.mean(axis=0), valid_features.std(axis=0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    features = torch.from_numpy(train_set.features)
    gains = torch.from_numpy(train_set.gains)
    valid = torch.from_numpy(train_set.valid)
    early_features = torch.from_numpy(early_stop_set.features)

    def early_stop_ndcg() -> float:
        model.eval()
        with torch.inference_mode():
            scores = model(early_features).numpy()
        model.train()
        return ndcg_at_10(scores, early_stop_set)

    best = (early_stop_ndcg(), 0, {k: v.clone() for k, v in model.state_dict().items()})
    report = TrainingReport(0, 0, best[0], 0.0)
    log.info("epoch 0: early-stop NDCG@10 %.4f (untrained)", best[0])
    model.train()
    for epoch in range(1, max_epochs + 1):
        order = rng.permutation(len(train_set.queries))
        losses = []
        for start in range(0, len(order), queries_per_step):
            batch = torch.from_numpy(order[start : start + queries_per_step])
            loss = listnet_loss(
                model(features[batch]), gains[batch], valid[batch], relevant_gain, recall_weight
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        ndcg = early_stop_ndcg()
        report.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "ndcg_at_10": ndcg})
        log.info("epoch %d: loss %.4f, early-stop NDCG@10 %.4f", epoch, np.mean(losses), ndcg)
        report.epochs_run = epoch
        if ndcg > best[0]:
            best = (ndcg, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            log.info("no improvement for %d epochs: stopping", patience)
            break
    model.load_state_dict(best[2])
    model.eval()
    report.best_early_stop_ndcg, report.best_epoch = best[0], best[1]
    report.seconds = time.perf_counter() - started
    return model, report


class MlpScorer:
    """The trained MLP as a candidate scorer: [n, width, F] -> [n, width] (numpy in and out)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(features)).numpy()


Scorer = Callable[[np.ndarray], np.ndarray]


def compare_on(
    examples: ExampleSet, scorer: Scorer, judgments: Judgments, ids: Mapping[int, bytes]
) -> dict:
    """Retrieval-order and ranked metrics on `examples` with the real metric code."""
    ranked_scores = scorer(examples.features)
    subset = judgments.restricted_to(examples.queries)
    result: dict[str, Metrics] = {}
    for name, scores in (("retrieval", examples.retrieval_scores), ("ranked", ranked_scores)):
        result[name] = evaluate(served_rankings(scores, examples, ids, contract.MAX_TOP_K), subset)
    return result


# Writes the trained ranker (an MLP's torch module, or a TreeScorer) into a model repository
# (ONNX and ranker.json, verified against the training framework) and returns what it recorded:
# `ecomsearch.export.ranker.export_search_ranker`. Passed in by the caller, so training does
# not depend on the export tooling.
RankerExporter = Callable[[Any, ModelRepositoryLayout, dict[str, Any]], dict[str, Any]]


RANKER_KINDS = ("mlp", "lambdamart")


def _training_summary(kind: str, report) -> dict[str, Any]:
    if kind == "mlp":
        return {
            "objective": "ListNet",
            "best_epoch": report.best_epoch,
            "epochs_run": report.epochs_run,
        }
    return {
        "objective": "LambdaMART (LightGBM lambdarank)",
        "best_round": report.best_round,
        "rounds_run": report.rounds_run,
    }


@dataclass(frozen=True)
class TrainRankerResult:
    report: TrainingReport | Any  # the chosen model's training report
    validation: dict[str, Metrics]
    counts: dict[str, int]
    export: dict[str, Any]  # what the exporter recorded (opset, max |ONNX - PyTorch|, ...)


def train_and_export(
    catalog: Path,
    judgments_path: Path,
    layout: ModelRepositoryLayout,
    cache_dir: Path,
    export: RankerExporter,
    seed: int = DEFAULT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    early_stop_fraction: float = 0.1,
    recall_weight: float = 0.0,
    data_description: str = "",
    kinds: Sequence[str] = RANKER_KINDS,
    teacher: Teacher | None = None,
    teacher_depth: int = 0,
    teacher_weight: float = 0.5,
) -> TrainRankerResult:
    """The whole command: index, split, candidates, training, validation, export (by `export`)
    and the model card. `data_description` says what the training data is, for the card.

    Every kind in `kinds` is trained on the same candidates and split; the one with the best
    NDCG@10 on the early-stopping queries (training data, never validation) ships, and the
    card shows all of them on the validation queries. With a `teacher` and `teacher_depth`,
    the fit queries' unjudged candidates are labelled by it (with_teacher_gains); early
    stopping and validation keep the judges' labels only."""
    from ecomsearch.evaluation.metrics import read_judgments
    from ecomsearch.ranking.card import write_model_card

    served = catalog_retrieval(catalog, cache_dir, layout.root)
    index, retriever, encoder, ids = served.index, served.retriever, served.encoder, served.ids
    judgments = read_judgments(judgments_path)
    evaluable = judgments.evaluable_queries()
    train_queries, validation_queries = split_queries(evaluable, seed, validation_fraction)
    fit_queries, early_stop_queries = split_queries(train_queries, seed + 1, early_stop_fraction)
    log.info(
        "queries: %d train (%d fit, %d early stopping), %d validation (never trained on)",
        len(train_queries),
        len(fit_queries),
        len(early_stop_queries),
        len(validation_queries),
    )
    all_queries = fit_queries + early_stop_queries + validation_queries
    examples = build_examples(all_queries, judgments, encoder, retriever, ids)
    side = np.array(
        [0] * len(fit_queries) + [1] * len(early_stop_queries) + [2] * len(validation_queries)
    )
    fit_set, early_set, validation_set = (examples.subset(side == s) for s in (0, 1, 2))
    distillation = None
    if teacher is not None and teacher_depth > 0:
        started = time.perf_counter()
        titles = {
            int(key): (product_id.decode("utf-8"), title.decode("utf-8"))
            for key, product_id, title in zip(index.keys, index.ids, index.titles, strict=True)
        }
        fit_set, pairs = with_teacher_gains(
            fit_set, judgments, titles, teacher, teacher_depth, teacher_weight
        )
        distillation = {
            "depth": teacher_depth,
            "weight": teacher_weight,
            "pairs_labelled": pairs,
            "seconds": round(time.perf_counter() - started, 1),
        }
        log.info("teacher labels: %s", distillation)

    trained: dict[str, tuple[Any, Scorer, Any]] = {}
    if "mlp" in kinds:
        model, report = train(
            fit_set,
            early_set,
            seed,
            relevant_gain=judgments.relevant_gain,
            recall_weight=recall_weight,
        )
        trained["mlp"] = (model, MlpScorer(model), report)
    if "lambdamart" in kinds:
        from ecomsearch.ranking.trees import train_lambdamart

        scorer, report = train_lambdamart(fit_set, early_set, seed)
        trained["lambdamart"] = (scorer, scorer, report)
    if not trained:
        raise ValueError(f"kinds must name at least one of {RANKER_KINDS}")
    # Each kind on the validation queries, once: the card reports them all, the chosen one's is
    # the model's own validation.
    validations = {
        kind: compare_on(validation_set, scorer, judgments, ids)
        for kind, (_, scorer, _) in trained.items()
    }
    comparison = {
        kind: {
            "early_stop_ndcg_at_10": ndcg_at_10(scorer(early_set.features), early_set),
            "validation_in_process": validations[kind]["ranked"].as_dict(),
            "training_seconds": round(report.seconds, 1),
        }
        for kind, (_, scorer, report) in trained.items()
    }
    chosen = max(comparison, key=lambda kind: comparison[kind]["early_stop_ndcg_at_10"])
    model, _, report = trained[chosen]
    log.info("ranker comparison: %s; shipping %s", comparison, chosen)
    validation = validations[chosen]
    for name, metrics in validation.items():
        log.info(
            "validation (%d queries, in-process) %s: NDCG@10 %.4f, Recall@100 %.4f, MRR@10 %.4f",
            metrics.queries,
            name,
            metrics.ndcg_at_10,
            metrics.recall_at_100,
            metrics.mrr_at_10,
        )
    counts = {
        "fit_queries": len(fit_queries),
        "early_stop_queries": len(early_stop_queries),
        "validation_queries": len(validation_queries),
        "catalog_products": index.count,
    }
    info = {
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_data": {
            "catalog": str(catalog),
            "judgments": str(judgments_path),
            "description": data_description,
            "grade_scale": [judgments.lowest, judgments.highest],
        },
        "seed": seed,
        "recall_weight": recall_weight,
        "distillation": distillation,
        "validation_fraction": validation_fraction,
        "counts": counts,
        "kind": chosen,
        "training": _training_summary(chosen, report),
        "comparison": comparison,
        "candidate_pools": {"vector": retriever.vector_pool, "lexical": retriever.lexical_pool},
        "validation_in_process": {k: v.as_dict() for k, v in validation.items()},
    }
    sample_rows = np.random.default_rng(seed).choice(
        int(fit_set.valid.sum()), size=min(4000, int(fit_set.valid.sum())), replace=False
    )
    info["feature_sample"] = fit_set.features[fit_set.valid][sample_rows]
    record = export(model, layout, info)
    write_model_card(layout.ranker_card, record)
    return TrainRankerResult(report, validation, counts, record)
