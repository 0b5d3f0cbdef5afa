"""Report folder: every file written, metrics.json keys, per_image.csv rows follow the label rule."""
import csv
import json

import numpy as np
import pytest

from eval.metrics import METRIC_KEYS, compute_metrics
from eval.report import select_grid_rows, write_report


def _data(n=9, size=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])[:n]
    types = ["good"] * 4 + ["crack", "crack", "hole", "hole", "hole"]
    masks = np.zeros((n, size, size), bool)
    masks[labels == 1, 4:9, 5:10] = True
    maps = rng.random((n, size, size)).astype(np.float32) * 0.5 + 0.6 * masks
    scores = maps.reshape(n, -1).max(1)
    inputs = rng.random((n, 3, size, size)).astype(np.float32)
    return scores, labels, types, maps, masks, inputs


def test_write_report_writes_everything(tmp_path):
    scores, labels, types, maps, masks, inputs = _data()
    threshold = 0.8
    metrics = compute_metrics(scores, labels, maps, masks, image_threshold=threshold, pixel_threshold=0.55)
    paths = [f"test/{t}/{i:03d}.png" for i, t in enumerate(types)]
    written = write_report(tmp_path / "report", metrics=metrics, scores=scores, labels=labels, defect_types=types,
                           paths=paths, threshold=threshold, pixel_threshold=0.55, seconds_per_image=0.25,
                           extra={"category": "synthetic", "calibration": {"image": threshold, "method": "quantile"}},
                           per_image={"map_mean": maps.mean(axis=(1, 2))},
                           inputs=inputs, reconstructions=inputs * 0.9, maps=maps, masks=masks, grid_rows=4)
    names = {"metrics.json", "per_image.csv", "roc.png", "pr.png", "pixel_roc.png", "pro.png", "histogram.png",
             "grid.png", "index.html", "overlays/page-001.html"}
    assert set(written) == names
    for name in names:
        assert (tmp_path / "report" / name).stat().st_size > 100
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
    required = {*METRIC_KEYS, "threshold", "seconds_per_image", "n_images", "category", "calibration"}
    assert required <= set(summary)
    assert summary["n_images"] == 9 and summary["threshold"] == 0.8 and summary["seconds_per_image"] == 0.25
    assert summary["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert set(summary["per_type_image_auroc"]) == {"crack", "hole"}
    assert set(summary["per_type_pixel_auroc"]) == {"crack", "hole"}
    assert summary["defect_pixel_share"] == {"crack": pytest.approx(0.4), "hole": pytest.approx(0.6)}
    with open(tmp_path / "report" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "defect_type", "label", "pred_score", "pred_label", "map_mean"]
    assert len(rows) == 9
    for row, s in zip(rows, scores):
        assert float(row["pred_score"]) == pytest.approx(s)
        assert int(row["pred_label"]) == int(s > threshold)
    html = (tmp_path / "report" / "index.html").read_text()
    assert "grid.png" in html and "hole" in html and "Image AUROC" in html and "share of defect pixels" in html


def test_report_without_pixels_or_defects(tmp_path):
    scores = np.array([0.1, 0.2, 0.3])
    labels = np.zeros(3, int)
    metrics = compute_metrics(scores, labels)
    written = write_report(tmp_path, metrics=metrics, scores=scores, labels=labels, defect_types=["good"] * 3,
                           paths=["a", "b", "c"], threshold=0.25)
    assert set(written) == {"metrics.json", "per_image.csv", "histogram.png", "index.html"}
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["image_auroc"] is None and summary["seconds_per_image"] is None


def test_report_rejects_bad_lengths_and_metrics(tmp_path):
    scores, labels, types, *_ = _data()
    metrics = compute_metrics(scores, labels)
    with pytest.raises(ValueError, match="paths"):
        write_report(tmp_path, metrics=metrics, scores=scores, labels=labels, defect_types=types, paths=["a"],
                     threshold=0.5)
    with pytest.raises(ValueError, match="missing"):
        write_report(tmp_path, metrics={}, scores=scores, labels=labels, defect_types=types, paths=types,
                     threshold=0.5)


def test_select_grid_rows():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8])
    labels = np.array([0, 0, 1, 1, 1, 1])
    # top defects (5, 3), missed defects (4, 2), then the highest good (1)
    assert select_grid_rows(scores, labels, 5) == [5, 3, 4, 2, 1]
    assert select_grid_rows(scores, labels, 100) == [5, 3, 2, 4, 1, 0]  # every image once
