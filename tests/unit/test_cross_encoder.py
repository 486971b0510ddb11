"""The cross-encoder: pair tokenization, its training pairs and loop, its verified export (on a
tiny randomly initialised BERT), and how its logits rerank a block of candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.evaluation.metrics import Judgments
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.ranking.rerank import BLOCK_MARGIN, depth_mask, rerank_terms
from ecomsearch.text import PairTokenizer
from ecomsearch.tuning.bi_encoder import TrainingQuery
from ecomsearch.tuning.cross_encoder import (
    CrossEncoderSettings,
    PairGroup,
    build_cross_encoder,
    head_weights,
    pair_groups,
    split_head,
    train_cross_encoder,
)
from ecomsearch.tuning.lora import AdapterConfig, AdapterError, adapter_weights, save_adapter

torch = pytest.importorskip("torch")
SMALL = AdapterConfig(rank=2, alpha=4.0)


# --- pairs -------------------------------------------------------------------------------------


def test_pairs_mark_the_product_side_and_truncate_it_first(tiny_checkpoint):
    tokenizer = PairTokenizer(tiny_checkpoint, max_length=12)
    input_ids, attention_mask, token_type_ids = tokenizer(
        ["tok5 tok6", "tok7"], ["tok8 tok9 tok10", " ".join(f"tok{i}" for i in range(20, 60))]
    )
    assert input_ids.shape == attention_mask.shape == token_type_ids.shape
    assert input_ids.shape[1] <= 12
    # The first pair: 2 query tokens then 3 product tokens, the rest padding.
    assert attention_mask[0].sum() == 5
    assert token_type_ids[0, :5].tolist() == [0, 0, 1, 1, 1]
    assert token_type_ids[0, 5:].sum() == 0
    # The second: the long product was cut to fit, the query kept whole.
    assert attention_mask[1].sum() == 12
    assert token_type_ids[1].tolist() == [0] + [1] * 11
    with pytest.raises(ValueError, match="2 queries for 1 texts"):
        tokenizer(["a", "b"], ["c"])


JUDGMENTS = Judgments({"drill": {"p1": 3.0, "p2": 2.0, "p3": 1.0}, "screws": {"p5": 2.5}}, 1.0, 3.0)


def test_pair_targets_are_gains_over_the_scale_and_mined_negatives_are_zero():
    examples = [
        TrainingQuery("drill", ("p1", "p2"), (2.0, 1.0), ("p3", "u1")),
        TrainingQuery("screws", ("p5",), (1.5,), ()),
    ]
    drill, screws = pair_groups(examples, JUDGMENTS)
    assert dict(zip(drill.products, drill.targets, strict=True)) == {
        "p1": 1.0,
        "p2": 0.5,
        "p3": 0.0,  # judged, lowest grade
        "u1": 0.0,  # mined, unjudged
    }
    assert screws.products == ("p5",) and screws.targets == (0.75,)


# --- training ----------------------------------------------------------------------------------


def toy_task(rng: np.random.Generator, queries: int = 24):
    """Each query names two words of its relevant product; its other products share none."""
    texts, groups = {}, []
    for q in range(queries):
        words = [f"tok{w}" for w in rng.choice(np.arange(5, 1000), 12, replace=False)]
        texts[f"r{q}"] = " ".join(words[:4])
        texts[f"n{q}a"] = " ".join(words[4:8])
        texts[f"n{q}b"] = " ".join(words[8:])
        groups.append(
            PairGroup(" ".join(words[:2]), (f"r{q}", f"n{q}a", f"n{q}b"), (1.0, 0.0, 0.0))
        )
    return texts, groups


def accuracy(model, tokenizer, groups, texts) -> float:
    """Share of queries whose relevant product (the first) scores strictly above the others."""
    right = 0
    for group in groups:
        arrays = tokenizer([group.query] * len(group.products), [texts[p] for p in group.products])
        with torch.inference_mode():
            scores = model(*map(torch.from_numpy, arrays))[:, 0].numpy()
        right += int(scores[0] > scores[1:].max())
    return right / len(groups)


def test_training_learns_which_product_the_query_names(tiny_checkpoint):
    texts, groups = toy_task(np.random.default_rng(0))
    settings = CrossEncoderSettings(
        steps=60, batch_queries=8, pairs_per_query=3, learning_rate=1e-2, seed=0
    )
    model, report = train_cross_encoder(
        tiny_checkpoint, groups, texts, settings, AdapterConfig(rank=4, alpha=8.0), progress=False
    )
    assert report.steps == 60 and report.groups == 24 and report.pairs_seen == 60 * 8 * 3
    assert report.history[-1]["loss"] < report.history[0]["loss"]
    tokenizer = PairTokenizer(tiny_checkpoint, max_length=16)
    # Before training the head scores every pair alike: none is strictly first.
    untrained = build_cross_encoder(tiny_checkpoint)
    assert accuracy(untrained, tokenizer, groups, texts) == 0.0
    assert accuracy(model, tokenizer, groups, texts) >= 0.9


# --- export ------------------------------------------------------------------------------------


def trained_cross_encoder(checkpoint):
    from ecomsearch.tuning.lora import add_adapters

    model = build_cross_encoder(checkpoint)
    add_adapters(model.transformer, SMALL, seed=1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0, 0.2)
        model.head.weight.normal_(0, 1.0)
        model.head.bias.fill_(0.3)
    return model.eval()


def test_export_builds_the_graph_from_the_adapter_and_head_and_verifies_it(
    tiny_checkpoint, tmp_path
):
    import onnxruntime as ort

    from ecomsearch.export.cross_encoder import export_cross_encoder

    trained = trained_cross_encoder(tiny_checkpoint)
    layout = ModelRepositoryLayout(tmp_path / "repository")
    weights = {**adapter_weights(trained.transformer), **head_weights(trained)}
    save_adapter(layout.cross_encoder_adapter_dir, weights, SMALL, {"steps": 3})
    result = export_cross_encoder(layout, tiny_checkpoint)

    assert result.onnx_path == layout.cross_encoder_onnx
    info = json.loads(layout.cross_encoder_info.read_text())
    assert info["adapter"]["layers"] == 12 and info["trained"] == {"steps": 3}
    assert info["max_abs_difference"] <= info["atol"]
    tokenizer = PairTokenizer(tiny_checkpoint, max_length=16)
    arrays = tokenizer(["tok5 tok6", "tok9"], ["tok7 tok8 tok10", "tok11"])
    names = [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.TOKEN_TYPE_IDS]
    session = ort.InferenceSession(str(layout.cross_encoder_onnx))
    (served,) = session.run(None, dict(zip(names, arrays, strict=True)))
    assert served.shape == (2, 1)
    with torch.no_grad():
        expected = trained(*map(torch.from_numpy, arrays)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_an_adapter_without_its_head_is_refused(tiny_checkpoint, tmp_path):
    from ecomsearch.export.cross_encoder import export_cross_encoder

    trained = trained_cross_encoder(tiny_checkpoint)
    layout = ModelRepositoryLayout(tmp_path / "repository")
    save_adapter(layout.cross_encoder_adapter_dir, adapter_weights(trained.transformer), SMALL, {})
    with pytest.raises(AdapterError, match=r"head\.weight"):
        export_cross_encoder(layout, tiny_checkpoint)
    assert not layout.cross_encoder_onnx.exists()


def test_split_head_separates_the_scoring_layer_from_the_factors(tiny_checkpoint):
    trained = trained_cross_encoder(tiny_checkpoint)
    factors, head = split_head({**adapter_weights(trained.transformer), **head_weights(trained)})
    assert set(head) == {"head.weight", "head.bias"}
    assert all(name.endswith((".lora_a", ".lora_b")) for name in factors)


# --- the rerank --------------------------------------------------------------------------------


def test_the_reranked_block_is_ordered_by_the_blend_and_stays_above_the_rest():
    scores = np.array([[3.0, 2.9, 2.8, 2.7]], np.float32)  # best first, as top_k gives them
    logits = np.array([[-4.0, 0.0, 4.0, 0.0]], np.float32)
    reranked = np.array([[True, True, True, False]])
    terms = rerank_terms(scores, logits, reranked, best_of_rest=np.array([2.7], np.float32))
    final = scores + terms
    # The third candidate, which the cross-encoder likes, now leads; the first falls to last
    # of the block but stays above the candidate it did not read.
    assert np.argsort(-final[0, :3]).tolist() == [2, 1, 0]
    assert final[0, :3].min() == pytest.approx(2.7 + BLOCK_MARGIN, abs=1e-5)
    assert terms[0, 3] == 0.0
    # Within the block, the differences are the blend's: ranker score + weight * logit.
    assert final[0, 2] - final[0, 1] == pytest.approx((2.8 + 4.0) - (2.9 + 0.0), abs=1e-5)


def test_no_lift_when_the_blend_stays_above_and_nothing_for_queries_that_did_not_ask():
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], np.float32)
    logits = np.array([[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]], np.float32)
    top_rows = np.array([[4, 5, 6], [7, 8, -1]])
    reranked = depth_mask(top_rows[:, :2], np.array([2, 0]))
    terms = rerank_terms(scores[:, :2], logits[:, :2], reranked, np.array([1.0, 1.0], np.float32))
    np.testing.assert_allclose(terms, [[1.0, 1.0], [0.0, 0.0]])


def test_depth_mask_takes_each_querys_own_depth_and_skips_padding():
    top_rows = np.array([[1, 2, 3], [4, -1, -1]])
    mask = depth_mask(top_rows, np.array([2, 3]))
    assert mask.tolist() == [[True, True, False], [True, False, False]]


def test_a_query_with_no_candidate_outside_the_block_gets_no_lift():
    terms = rerank_terms(
        np.array([[1.0, 0.5]], np.float32),
        np.array([[0.0, -2.0]], np.float32),
        np.array([[True, True]]),
        np.array([-np.inf], np.float32),
    )
    np.testing.assert_allclose(terms, [[0.0, -2.0]])


@pytest.mark.slow
def test_train_cross_encoder_trains_saves_with_its_card_and_exports(tiny_checkpoint, tmp_path):
    """The whole command on a small judged slice of the demo catalog, on the tiny checkpoint:
    pairs from the judgments and the served retrieval's negatives, the adapter and head saved
    with the record and card, then the exporter called."""
    from ecomsearch.fingerprint import file_sha256
    from ecomsearch.tuning.cross_encoder import train_cross_encoder_and_export
    from ecomsearch.tuning.lora import load_adapter
    from tests.unit.test_ranker_training import judged_repository

    layout, catalog, judgments = judged_repository(tmp_path)
    exported = []

    def exporter():
        exported.append(True)
        return {"fingerprint": "f" * 64, "max_abs_difference": 0.0}

    result = train_cross_encoder_and_export(
        catalog,
        judgments,
        layout,
        cache_dir=tmp_path / "cache",
        export=exporter,
        checkpoint=tiny_checkpoint,
        settings=CrossEncoderSettings(steps=4, batch_queries=4),
        adapter_config=SMALL,
        data_description="Made-up judgments over the demo catalog.",
        validation_fraction=0.3,
    )
    assert exported == [True] and result.report.steps == 4
    config, weights, info = load_adapter(layout.cross_encoder_adapter_dir)
    factors, head = split_head(weights)
    assert config == SMALL and len(factors) == 2 * 12 and set(head) == {"head.weight", "head.bias"}
    assert np.abs(head["head.weight"]).sum() > 0  # the head trained away from zero
    counts = info["counts"]
    assert counts["training_queries"] > 0 and counts["validation_queries_held_out"] > 0
    assert info["mined_with_encoder"] == file_sha256(layout.encoder_onnx)
    card = " ".join(layout.cross_encoder_card.read_text().split())
    assert "Made-up judgments over the demo catalog." in card and "4 steps of 4 queries" in card


def test_the_shipped_cross_encoder_has_the_card_of_its_record():
    from ecomsearch.tuning.card import render_cross_encoder_card
    from ecomsearch.tuning.lora import load_adapter
    from tests.project import MODEL_REPOSITORY

    layout = ModelRepositoryLayout(MODEL_REPOSITORY)
    _, weights, info = load_adapter(layout.cross_encoder_adapter_dir)
    assert weights and all(np.isfinite(w).all() for w in weights.values())
    assert layout.cross_encoder_card.read_text() == render_cross_encoder_card(info)
