"""Fine-tuning the encoder: low-rank adapters, their merge into the exported graph, negatives
mining and the contrastive loop, on a tiny randomly initialised BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecomsearch import contract
from ecomsearch.evaluation.metrics import Judgments
from ecomsearch.export import encoder as encoder_export
from ecomsearch.paths import ModelRepositoryLayout
from ecomsearch.tuning.bi_encoder import (
    EncoderTrainingSettings,
    TrainingQuery,
    add_mined_negatives,
    judged_examples,
    train_adapter,
)
from ecomsearch.tuning.lora import (
    AdapterConfig,
    AdapterError,
    adapter_weights,
    add_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from ecomsearch.tuning.sentence_encoder import build_sentence_encoder

torch = pytest.importorskip("torch")
SMALL = AdapterConfig(rank=2, alpha=4.0)


def token_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(5, 1100, size=(3, 9)))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def trained_adapter(checkpoint):
    """A wrapped encoder whose adapters are non-zero (as after training)."""
    model = build_sentence_encoder(checkpoint)
    add_adapters(model.transformer, SMALL, seed=1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0, 0.2)
    return model.eval()


def test_adapters_start_as_the_identity_and_only_they_train(tiny_checkpoint):
    plain = build_sentence_encoder(tiny_checkpoint)
    wrapped = build_sentence_encoder(tiny_checkpoint)
    names = add_adapters(wrapped.transformer, SMALL)
    # 2 layers x 6 targets
    assert len(names) == 12 and all("lora" not in n for n in names)
    ids, mask = token_inputs()
    with torch.no_grad():
        assert torch.allclose(plain(ids, mask), wrapped(ids, mask), atol=1e-6)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)


def test_merged_weights_compute_what_the_adapted_model_computes(tiny_checkpoint, tmp_path):
    adapted = trained_adapter(tiny_checkpoint)
    save_adapter(tmp_path, adapter_weights(adapted.transformer), SMALL, {"note": "test"})
    config, weights, info = load_adapter(tmp_path)
    assert config == SMALL and info["note"] == "test"
    merged = build_sentence_encoder(tiny_checkpoint)
    assert merge_adapter(merged.transformer, config, weights) == 12
    plain = build_sentence_encoder(tiny_checkpoint)
    ids, mask = token_inputs()
    with torch.no_grad():
        assert torch.allclose(adapted(ids, mask), merged(ids, mask), atol=1e-5)
        assert not torch.allclose(plain(ids, mask), merged(ids, mask), atol=1e-3)


def test_a_foreign_or_partial_adapter_is_refused(tiny_checkpoint):
    adapted = trained_adapter(tiny_checkpoint)
    weights = adapter_weights(adapted.transformer)
    model = build_sentence_encoder(tiny_checkpoint)
    partial = {k: v for k, v in weights.items() if not k.endswith("query.lora_b")}
    with pytest.raises(AdapterError, match="lacks one of its two factors"):
        merge_adapter(model.transformer, SMALL, partial)
    with pytest.raises(AdapterError, match="do not fit"):
        merge_adapter(model.transformer, AdapterConfig(rank=3, alpha=6.0), weights)
    renamed = {k.replace("encoder.layer", "decoder.block"): v for k, v in weights.items()}
    with pytest.raises(AdapterError, match="not a linear layer"):
        merge_adapter(model.transformer, SMALL, renamed)


def test_export_merges_the_adapter_and_verifies_the_result(tiny_checkpoint, tmp_path):
    import onnxruntime as ort

    adapted = trained_adapter(tiny_checkpoint)
    adapter_dir = tmp_path / "adapter"
    save_adapter(adapter_dir, adapter_weights(adapted.transformer), SMALL, {})
    layout = ModelRepositoryLayout(tmp_path / "repository")
    encoder_export.export_encoder(tiny_checkpoint, layout, adapter_dir=adapter_dir)

    info = json.loads(layout.encoder_info.read_text())
    assert info["adapter"]["layers"] == 12 and info["adapter"]["rank"] == 2
    assert len(info["adapter"]["sha256"]) == 64
    ids, mask = token_inputs(seed=3)
    session = ort.InferenceSession(str(layout.encoder_onnx))
    (served,) = session.run(
        None, {contract.INPUT_IDS: ids.numpy(), contract.ATTENTION_MASK: mask.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(served, adapted(ids, mask).numpy(), atol=1e-4)


JUDGMENTS = Judgments(
    {
        "drill": {"p1": 3.0, "p2": 2.0, "p3": 1.0},
        "saw": {"p4": 1.0},  # nothing relevant: not a training query
        "screws": {"p5": 2.67, "p9": 1.33},
    },
    1.0,
    3.0,
)


def test_examples_keep_relevant_products_as_positives_and_judged_irrelevant_as_negatives():
    examples = judged_examples(["drill", "saw", "screws"], JUDGMENTS, {"p1", "p2", "p3", "p5"})
    assert [e.query for e in examples] == ["drill", "screws"]
    drill = examples[0]
    assert drill.positives == ("p1", "p2") and drill.positive_weights == (2.0, 1.0)
    assert drill.negatives == ("p3",)
    assert examples[1].negatives == ()  # p9 is not in the catalog


def test_mined_negatives_skip_the_top_unjudged_and_never_take_a_relevant_product():
    example = TrainingQuery("drill", ("p1", "p2"), (2.0, 1.0), ("p3",))
    ranked = {"drill": ["p1", "u1", "p2", "u2", "p3", "u3", "u4", "u5"]}
    (mined,) = add_mined_negatives([example], ranked, JUDGMENTS, per_query=3, skip=2)
    # u1 and u2 are skipped (likely relevant, merely unjudged); p1, p2 are judged relevant.
    assert mined.negatives == ("p3", "u3", "u4")
    (no_skip,) = add_mined_negatives([example], ranked, JUDGMENTS, per_query=8, skip=0)
    assert no_skip.negatives == ("p3", "u1", "u2", "u3", "u4", "u5")


def test_training_pulls_queries_towards_their_products(tiny_checkpoint):
    rng = np.random.default_rng(0)
    texts = {f"p{i}": " ".join(f"tok{t}" for t in rng.integers(5, 1100, 6)) for i in range(48)}
    # Each query shares two words with its product: learnable, but not from random weights.
    examples = [
        TrainingQuery(
            " ".join(texts[f"p{i}"].split()[:2]) + f" tok{1000 + i % 50}",
            (f"p{i}",),
            (2.0,),
            (f"p{(i + 1) % 48}",),
        )
        for i in range(48)
    ]

    def margin(model) -> float:
        from ecomsearch.text import TextTokenizer

        tokenizer = TextTokenizer(tiny_checkpoint, max_length=16)
        with torch.no_grad():
            q = model(*map(torch.from_numpy, tokenizer([e.query for e in examples])))
            p = model(*map(torch.from_numpy, tokenizer([texts[e.positives[0]] for e in examples])))
        similarity = (q @ p.T).numpy()
        return float(np.mean(np.diag(similarity)) - np.mean(similarity))

    before = margin(build_sentence_encoder(tiny_checkpoint))
    settings = EncoderTrainingSettings(epochs=6, batch_queries=16, learning_rate=5e-3, seed=0)
    model, report = train_adapter(
        tiny_checkpoint, examples, texts, settings, AdapterConfig(rank=4, alpha=8.0), progress=False
    )
    assert report.steps == 6 * 3 and report.with_negatives == 48
    assert margin(model) > before + 0.05


def test_the_encoder_card_states_what_was_trained():
    from ecomsearch.tuning.card import render_encoder_card

    record = {
        "adapter": SMALL.as_dict(),
        "trained_at": "2026-01-01T00:00:00+00:00",
        "base_checkpoint": "all-MiniLM-L6-v2",
        "training_data": {"catalog": "/x/shop.jsonl", "judgments": "/x/j.csv", "description": ""},
        "mining": {"depth": 50, "skip_unjudged": 10},
        "mined_with_encoder": "ab" * 32,
        "settings": EncoderTrainingSettings(epochs=3).as_dict(),
        "counts": {
            "training_queries": 1234,
            "validation_queries_held_out": 56,
            "catalog_products": 7890,
        },
        "steps": 60,
        "training_seconds": 99.4,
    }
    card = render_encoder_card(record)
    flat = " ".join(card.split())
    assert "LoRA rank 2, alpha 4" in flat and "3 epochs" in flat and "(60 steps)" in flat
    assert "1,234 training queries" in flat and "7,890 products" in flat and "99 s" in flat
    assert "encoder abababababab" in flat
    assert max(len(line) for line in card.splitlines()) <= 100
    assert "`shop.jsonl`" in card and "--data-description" in card
    described = {**record, "training_data": {**record["training_data"], "description": "A shop."}}
    assert "A shop." in render_encoder_card(described)


def test_a_shipped_adapter_has_the_card_of_its_record():
    from ecomsearch.tuning.card import render_encoder_card
    from tests.project import MODEL_REPOSITORY

    layout = ModelRepositoryLayout(MODEL_REPOSITORY)
    if not layout.encoder_adapter_dir.is_dir():
        pytest.skip("no adapter is shipped")
    _, weights, info = load_adapter(layout.encoder_adapter_dir)
    assert weights and all(np.isfinite(w).all() for w in weights.values())
    assert layout.encoder_card.read_text() == render_encoder_card(info)


@pytest.mark.slow
def test_train_encoder_mines_trains_saves_and_exports_through_the_given_exporter(
    tiny_checkpoint, tmp_path
):
    """The whole command on a small judged slice of the demo catalog: negatives are mined with
    the repository's served encoder, the adapter is trained on the tiny checkpoint (so it is
    quick), saved with its card, and handed to the exporter."""
    from ecomsearch.fingerprint import file_sha256
    from ecomsearch.tuning.bi_encoder import train_encoder_and_export
    from tests.unit.test_ranker_training import judged_repository

    layout, catalog, judgments = judged_repository(tmp_path)
    exported = []

    def exporter(adapter_dir):
        exported.append(adapter_dir)
        return {"fingerprint": "f" * 64, "max_abs_difference": 0.0}

    result = train_encoder_and_export(
        catalog,
        judgments,
        layout,
        cache_dir=tmp_path / "cache",
        export=exporter,
        checkpoint=tiny_checkpoint,
        settings=EncoderTrainingSettings(epochs=1, batch_queries=8),
        adapter_config=SMALL,
        data_description="Made-up judgments over the demo catalog.",
        validation_fraction=0.3,
    )

    assert exported == [layout.encoder_adapter_dir]
    config, weights, info = load_adapter(layout.encoder_adapter_dir)
    assert config == SMALL and len(weights) == 2 * 12
    counts = info["counts"]
    assert counts["training_queries"] == result.report.examples > 0
    assert counts["validation_queries_held_out"] > 0
    # Every training query has a negative: judged-irrelevant products of other categories.
    assert counts["training_queries_with_negatives"] == counts["training_queries"]
    assert info["mined_with_encoder"] == file_sha256(layout.encoder_onnx)
    card = layout.encoder_card.read_text()
    assert "Made-up judgments over the demo catalog." in card
    assert f"{counts['training_queries']:,} training queries" in " ".join(card.split())
