"""eval/overlays.py: threshold-tied colour scale, overlay PNGs, paged HTML; evaluate and score write them."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib import pyplot as plt
from PIL import Image

from eval.overlays import (CLEAR_QUANTILE, FADE_BELOW, MAX_ALPHA, NEAR_ALPHA, SCALE_MAX, clear_level, overlay_rgba,
                           save_overlay, write_overlay_pages)
from eval.metrics import compute_metrics
from eval.report import write_report


def test_the_threshold_sits_mid_scale_and_good_pixels_are_transparent():
    threshold = 0.02
    amap = np.array([[0.0, FADE_BELOW * threshold * 0.99, threshold, threshold * 1.001, SCALE_MAX * threshold, 10.0]],
                    np.float32)
    rgba = overlay_rgba(amap, threshold)  # no clear level: FADE_BELOW of the threshold
    np.testing.assert_allclose(rgba[0, :, 3], [0.0, 0.0, NEAR_ALPHA, MAX_ALPHA, MAX_ALPHA, MAX_ALPHA])
    cmap = plt.get_cmap("turbo")
    np.testing.assert_allclose(rgba[0, 2, :3], cmap(0.5)[:3])  # the threshold: the middle colour
    np.testing.assert_allclose(rgba[0, 5, :3], cmap(1.0)[:3])  # clipped at the top of the scale
    # the same map in other units (x 1000) with its threshold gives the same picture
    np.testing.assert_allclose(overlay_rgba(amap * 1000, threshold * 1000), rgba, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        overlay_rgba(amap, 0.0)


def test_the_clear_level_of_good_maps_leaves_a_good_part_clean_and_a_flagged_region_opaque():
    rng = np.random.default_rng(0)
    good_maps = rng.uniform(0.0, 1.0, (20, 32, 32)).astype(np.float32)  # good pixels spread up to 1
    threshold = 1.05  # the pixel threshold: just above every good pixel, as calibration puts it
    clear = clear_level(good_maps)
    assert clear == pytest.approx(np.quantile(good_maps, CLEAR_QUANTILE), rel=1e-6)
    assert 0.98 < clear < 1.0
    good = rng.uniform(0.0, 1.0, (32, 32)).astype(np.float32)
    # tied to the good distribution: 99 % of a good part's pixels are fully transparent, none is opaque
    alpha = overlay_rgba(good, threshold, clear)[..., 3]
    assert np.mean(alpha == 0.0) > 0.97 and alpha.max() <= NEAR_ALPHA
    # a fixed share of the threshold (the old cut) tints a quarter of the same good part
    assert np.mean(overlay_rgba(good, threshold)[..., 3] > 0) > 0.2
    flagged = good.copy()
    flagged[8:16, 8:16] = 1.5 * threshold
    alpha = overlay_rgba(flagged, threshold, clear)[..., 3]
    assert np.allclose(alpha[8:16, 8:16], MAX_ALPHA) and np.mean(alpha[16:] == 0.0) > 0.97
    # a clear level at or above the threshold (an F1 pixel threshold under the good quantile): only flagged shows
    np.testing.assert_allclose(overlay_rgba(np.array([[0.9, 1.1]]), 1.0, clear=1.2)[..., 3], [[0.0, MAX_ALPHA]])
    assert clear_level([]) is None and clear_level([np.array([[np.nan]])]) is None


def test_save_overlay_writes_a_png_and_checks_sizes(tmp_path):
    image = np.random.default_rng(0).random((1, 40, 24)).astype(np.float32)
    amap = np.zeros((40, 24), np.float32)
    amap[10:20, 5:15] = 1.0
    gt = np.zeros((40, 24), bool)
    gt[12:22, 6:16] = True
    path = save_overlay(tmp_path / "o" / "x.png", image, amap, 0.5, gt, title="x")
    with Image.open(path) as png:
        assert png.size[0] > 100 and png.size[1] > 100
    with pytest.raises(ValueError, match="same size"):
        save_overlay(tmp_path / "y.png", image, amap[:30], 0.5)


def test_pages_link_each_other(tmp_path):
    pages = write_overlay_pages(tmp_path, [f"{i}.png" for i in range(5)], [f"c{i}" for i in range(5)],
                                ["miss", "", "", "false-alarm", ""], per_page=2)
    assert [p.name for p in pages] == ["page-001.html", "page-002.html", "page-003.html"]
    second = pages[1].read_text()
    assert 'href="page-001.html"' in second and 'href="page-003.html"' in second and "<b>2</b>" in second
    assert '<img src="2.png"' in second and '<img src="3.png"' in second and '"4.png"' not in second
    assert 'class="false-alarm"' in second


def test_report_overlays_every_image_highest_score_first(tmp_path):
    rng = np.random.default_rng(1)
    n = 5
    maps = rng.random((n, 16, 16)).astype(np.float32) * 0.1
    maps[3, 4:8, 4:8] = 1.0
    masks = np.zeros((n, 16, 16), bool)
    masks[3, 4:9, 4:9] = True
    scores, labels = maps.max(axis=(1, 2)), np.array([0, 0, 1, 1, 0])
    written = write_report(tmp_path, metrics=compute_metrics(scores, labels, maps, masks), scores=scores,
                           labels=labels, defect_types=["good", "good", "dent", "dent", "good"],
                           paths=[f"/d/{i}.png" for i in range(n)], threshold=0.5,
                           per_image={"name": [f"t/{i}" for i in range(n)]}, inputs=rng.random((n, 1, 16, 16)),
                           maps=maps, masks=masks)
    assert sorted(p.name for p in (tmp_path / "overlays" / "t").iterdir()) == [f"{i}.png" for i in range(n)]
    page = written["overlays/page-001.html"].read_text()
    assert page.index('"t/3.png"') < page.index('"t/0.png"')  # highest score first
    assert page.count('class="miss"') == 1  # image 2 is a defect scored under the threshold
    assert "overlays/page-001.html" in written["index.html"].read_text()


def test_score_save_overlays_writes_one_per_scored_file(tmp_path):
    from anoddpm.bundle import update_threshold
    from anoddpm.cli import main
    from anoddpm.data.synth import make_synthetic_dataset
    from test_evaluate_cli import make_bundle, tiny_config

    cat = make_synthetic_dataset(tmp_path / "data", category="cat", size=32, n_train=3, n_test_good=1, n_test_defect=2)
    model = make_bundle(tmp_path / "model.pt", tmp_path / "data", "cat")
    args = ["score", "--model", str(model), "--input", str(cat / "test"), "--out", str(tmp_path / "out"),
            "--save-overlays"]
    assert main(args) == 2  # no threshold: nothing to tie the colour scale to
    update_threshold(model, {"image": 0.05, "pixel": 0.02, "method": "quantile", "quantile": 0.99, "n_good": 2,
                             "detect": tiny_config().to_dict()["detect"]})  # calibrated for its own settings
    assert main(args) == 0
    written = sorted(p.relative_to(tmp_path / "out" / "overlays").as_posix()
                     for p in (tmp_path / "out" / "overlays").rglob("*.png"))
    # one overlay per input, named by its path under the inputs' common folder + ".png" (score's map names)
    assert written == sorted(p.relative_to(cat / "test").as_posix() + ".png" for p in (cat / "test").rglob("*.png"))


def test_score_overlays_use_the_calibrations_clear_level():
    from anoddpm.cli.score import _overlay_clear

    assert _overlay_clear({"good_cache": {"pixel_quantiles": {"0.99": 0.3}}}) == 0.3
    assert _overlay_clear({"good_cache": {"pixel_quantiles": {"0.99": float("nan")}}}) is None
    assert _overlay_clear({"image": 1.0}) is None and _overlay_clear(None) is None  # older calibrations: default cut
