"""The demo's steps end to end through the CLI at reduced size: synth, train, evaluate, export, inspect."""
from __future__ import annotations

import json

import pytest

from anoddpm.cli.demo import MARKER, fresh_demo_folder, run_demo
from eval.metrics import METRIC_KEYS


def test_demo_steps_end_to_end(tmp_path):
    summary = run_demo(tmp_path, minutes=2.0, size=32, preset="tiny", n_train=12, max_steps=4)
    metrics = summary["metrics"]
    assert set(METRIC_KEYS) <= metrics.keys()
    assert metrics["n_images"] == 50  # synth's default 20 good + 30 defective test images
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["threshold"] > 0
    assert (tmp_path / "report" / "index.html").is_file()
    assert (tmp_path / "model.onnx").stat().st_size > 0
    records = summary["inspections"]
    assert len(records) == 5 and all({"pred_score", "pred_label", "latency_ms"} <= r.keys() for r in records)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if "step" in r) == 4


def test_a_demo_folder_can_be_reused_and_a_foreign_one_is_refused(tmp_path):
    out = tmp_path / "demo_out"
    fresh_demo_folder(out)
    (out / "data" / "demo").mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    fresh_demo_folder(out)  # a second `make demo`
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "notes.txt"])
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not written by the demo"):
        fresh_demo_folder(foreign)
    assert (foreign / "a.png").exists()
