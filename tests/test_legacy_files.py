"""Files written by an earlier anoddpm (tests/fixtures/legacy, made by tests/fixtures/make_legacy.py on main f525ab2,
before the detection package was redesigned) load and give the scores they gave then."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import anoddpm

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def _recorded(name: str) -> dict[str, tuple[float, bool]]:
    if name.endswith(".csv"):
        with open(LEGACY / name, newline="") as f:
            return {Path(r["path"]).name: (float(r["pred_score"]), r["pred_label"] == "1") for r in csv.DictReader(f)}
    records = [json.loads(line) for line in (LEGACY / name).read_text().splitlines()]
    return {Path(r["path"]).name: (r["pred_score"], r["pred_label"]) for r in records}


@pytest.mark.parametrize("model, record", [("model.pt", "model_scores.csv"), ("model.onnx", "onnx_inspections.jsonl")])
def test_a_legacy_file_loads_and_scores_the_same(model: str, record: str) -> None:
    expected = _recorded(record)
    assert len(expected) == 6
    images = sorted((LEGACY / "images").glob("*.png"))
    predictions = anoddpm.load(LEGACY / model, device="cpu").predict(images)
    for path, prediction in zip(images, predictions):
        score, label = expected[path.name]
        assert prediction.pred_score == pytest.approx(score, abs=1e-5)
        assert prediction.pred_label is label
