"""What a quality engineer decides with: false rejects and escapes at the threshold, in metrics.json, the HTML
summary and the plots (operating points, pixel ROC, PRO curve)."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from eval import metrics as M
from eval.report import write_report


def test_operating_point_counts_false_rejects_and_escapes_by_the_label_rule():
    scores = np.array([0.1, 0.5, 0.9, 0.2, 0.6, 0.5, 0.7, 0.3, 0.8])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    types = ["good"] * 4 + ["crack", "crack", "hole", "hole", "hole"]
    point = M.operating_point(scores, labels, 0.5, types)
    # good 0.9 is flagged (0.5 is not: equality passes); defects 0.5 (crack) and 0.3 (hole) pass
    assert point == {"false_rejects": 1, "false_reject_rate": 0.25, "escapes": 2, "escape_rate": 0.4,
                     "per_type_escape_rate": {"crack": 0.5, "hole": pytest.approx(1 / 3)}}
    # the same point lies on the image ROC curve: fpr = false reject rate, tpr = 1 - escape rate
    fpr, tpr, thresholds = roc_curve(labels, scores)
    lowest_flagged = scores[scores > 0.5].min()
    k = int(np.flatnonzero(thresholds == lowest_flagged)[0])
    assert (fpr[k], tpr[k]) == (0.25, 0.6)
    only_good = M.operating_point(np.array([0.1, 0.7]), np.array([0, 0]), 0.5)
    assert only_good["escapes"] == 0 and only_good["escape_rate"] is None and only_good["false_reject_rate"] == 0.5
    with pytest.raises(ValueError, match="finite"):
        M.operating_point(scores, labels, float("nan"))


def test_pixel_operating_point_matches_a_direct_count():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 12, 12))
    masks = np.zeros((4, 12, 12), bool)
    masks[1, 2:5, 2:5] = True  # region A: 9 pixels
    masks[2, 6:8, 1:9] = True  # region B: 16 pixels
    maps[1, 2:5, 2:5] += 0.6
    point = M.pixel_operating_point(maps, masks, 0.8)
    flagged = maps > 0.8
    assert point["fpr"] == pytest.approx(flagged[~masks].mean())
    assert point["tpr"] == pytest.approx(flagged[masks].mean())
    assert point["pro"] == pytest.approx((flagged[1, 2:5, 2:5].mean() + flagged[2, 6:8, 1:9].mean()) / 2)
    fpr, tpr = M.pixel_roc_curve(maps, masks)
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and np.all(np.diff(tpr) >= 0)


def _labelled_set(n_good=6, n_defect=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_defect, int)]
    types = ["good"] * n_good + ["crack"] * (n_defect // 2) + ["hole"] * (n_defect - n_defect // 2)
    masks = np.zeros((labels.size, size, size), bool)
    masks[labels == 1, 6:12, 8:14] = True
    maps = (rng.random((labels.size, size, size)) * 0.5 + 0.8 * masks).astype(np.float32)
    maps[n_good + 1] = rng.random((size, size)) * 0.5  # a defect the map misses: an escape
    maps[0, 0:3, 0:3] = 1.2  # a good part with a hot corner: a false reject
    scores = maps.reshape(labels.size, -1).max(1)
    return scores, labels, types, maps, masks, rng.random((labels.size, 1, size, size)).astype(np.float32)


def test_report_says_how_many_good_parts_are_rejected_and_defects_pass(tmp_path):
    scores, labels, types, maps, masks, inputs = _labelled_set()
    threshold = 0.9
    metrics = M.compute_metrics(scores, labels, maps, masks, image_threshold=threshold, pixel_threshold=0.55)
    written = write_report(tmp_path, metrics=metrics, scores=scores, labels=labels, defect_types=types,
                           paths=[f"{i}.png" for i in range(labels.size)], threshold=threshold, pixel_threshold=0.55,
                           inputs=inputs, maps=maps, masks=masks, overlay_clear=0.45)
    summary = json.loads(written["metrics.json"].read_text())
    assert summary["false_rejects"] == 1 and summary["false_reject_rate"] == pytest.approx(1 / 6)
    assert summary["escapes"] == 1 and summary["escape_rate"] == pytest.approx(1 / 6)
    assert summary["per_type_escape_rate"] == {"crack": pytest.approx(1 / 3), "hole": 0.0}
    assert summary["overlay_clear"] == 0.45
    page = written["index.html"].read_text()
    assert "1 of 6 good parts rejected (false rejects, 16.7 %)" in page
    assert "1 of 6 defects passed (escapes, 16.7 %)" in page and "escape rate" in page and "33.3 %" in page
    for name in ("pixel_roc.png", "pro.png", "roc.png", "pr.png", "grid.png"):
        assert f'src="{name}"' in page
        with Image.open(written[name]) as png:
            assert png.size[0] > 200 and png.size[1] > 200
    # default clear level: the good test images' CLEAR_QUANTILE pixel quantile
    again = write_report(tmp_path / "b", metrics=metrics, scores=scores, labels=labels, defect_types=types,
                         paths=[f"{i}.png" for i in range(labels.size)], threshold=threshold, inputs=inputs,
                         maps=maps, masks=masks)
    clear = json.loads(again["metrics.json"].read_text())["overlay_clear"]
    assert clear == pytest.approx(np.quantile(maps[labels == 0], 0.99), rel=1e-6)


def test_every_grid_map_has_a_colour_bar_with_the_threshold_on_it(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from eval.plots import plot_grid

    bars = []
    colorbar = Figure.colorbar

    def record(self, mappable, *args, **kwargs):
        bars.append(colorbar(self, mappable, *args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(Figure, "colorbar", record)
    scores, labels, types, maps, masks, inputs = _labelled_set(n_good=2, n_defect=3)
    plot_grid(inputs, inputs, maps, masks, tmp_path / "grid.png", threshold=0.55)
    assert len(bars) == 5  # one per row's map
    for bar in bars:
        assert bar.mappable.get_clim() == (0.0, pytest.approx(float(maps.max())))
        assert [line.get_ydata()[0] for line in bar.ax.lines] == [0.55]  # the threshold marked
