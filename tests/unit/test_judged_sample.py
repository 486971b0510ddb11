"""The relevance gate's sample: validation queries only, all their judged products, a fixed
set of distractors, the same on every run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ecomsearch.evaluation.metrics import read_judgments
from ecomsearch.evaluation.sample import write_judged_sample
from ecomsearch.evaluation.splits import is_validation_query


def shop(directory: Path) -> tuple[Path, Path]:
    catalog = directory / "catalog.jsonl"
    catalog.write_text(
        "".join(json.dumps({"id": f"p{i}", "title": f"product {i}"}) + "\n" for i in range(400))
    )
    judgments = directory / "judgments.csv"
    with judgments.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["query", "product_id", "relevance"])
        for q in range(200):
            for j in range(3):
                writer.writerow([f"query {q}", f"p{(q * 7 + j) % 400}", [3, 2.33, 1][j]])
            writer.writerow([f"query {q}", "not-in-the-catalog", 3])
    return catalog, judgments


def test_the_sample_is_validation_queries_their_products_and_fixed_distractors(tmp_path):
    catalog, judgments = shop(tmp_path)
    first = write_judged_sample(catalog, judgments, tmp_path / "a", queries=20, distractors=50)
    again = write_judged_sample(catalog, judgments, tmp_path / "b", queries=20, distractors=50)
    assert first.catalog.read_text() == again.catalog.read_text()
    assert first.judgments.read_text() == again.judgments.read_text()

    sampled = read_judgments(first.judgments)
    assert len(sampled.grades) == first.queries == 20
    assert all(is_validation_query(q) for q in sampled.grades)
    ids = [json.loads(line)["id"] for line in first.catalog.read_text().splitlines()]
    judged = {pid for by in sampled.grades.values() for pid in by}
    assert judged <= set(ids) and "not-in-the-catalog" not in judged
    assert len(ids) == len(judged) + 50 == first.judged_products + first.distractors
    source = read_judgments(judgments)
    for query, grades in sampled.grades.items():
        assert grades == {p: g for p, g in source.grades[query].items() if p in set(ids)}


def test_asking_for_more_queries_than_the_validation_split_has_fails(tmp_path):
    catalog, judgments = shop(tmp_path)
    with pytest.raises(ValueError, match="validation queries"):
        write_judged_sample(catalog, judgments, tmp_path / "out", queries=150)
