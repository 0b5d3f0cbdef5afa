"""Issue 4's acceptance check: a tiny model trained briefly on `anoddpm synth` data separates good
from defective images (image AUROC >= 0.9) through `anoddpm evaluate`, with the default settings."""
from __future__ import annotations

import json

from anoddpm.cli import main


def test_tiny_model_trained_briefly_detects_generated_defects(tmp_path):
    data, run, report = tmp_path / "data", tmp_path / "run", tmp_path / "report"
    assert main(["synth", "--out", str(data), "--category", "demo", "--size", "32", "--seed", "0"]) == 0
    assert main(["train", "--data", str(data), "--category", "demo", "--out", str(run), "--image-size", "32",
                 "--preset", "tiny", "--max-steps", "200"]) == 0
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(data), "--category", "demo",
                 "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_images"] == 50
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.85, metrics
