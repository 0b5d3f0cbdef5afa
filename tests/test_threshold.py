"""Threshold calibration: quantile of good scores, F1-optimal with labelled defects, readable errors."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from eval import threshold as T


def test_quantile_threshold_flags_about_one_percent_of_good():
    good = np.random.default_rng(0).normal(size=1000)
    t = T.quantile_threshold(good, 0.99)
    assert t == pytest.approx(np.quantile(good, 0.99))
    assert 5 <= np.sum(good > t) <= 10
    assert T.quantile_threshold(good, 1.0) == good.max()
    assert np.sum(good > T.quantile_threshold(good, 1.0)) == 0


def test_f1_threshold_separable_lands_between_classes():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 1, 1, 1])
    assert T.f1_threshold(scores, labels) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_threshold_is_optimal_under_label_rule(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # ties included
    t = T.f1_threshold(scores, labels)
    best = max(f1_score(labels, scores > c) for c in np.r_[scores.min() - 1, np.unique(scores)])
    assert f1_score(labels, scores > t) == pytest.approx(best)


def test_f1_threshold_all_flagged_case():
    # best F1 flags every image; threshold must sit just below the minimum (score > t)
    scores = np.array([0.5, 0.6, 0.7])
    labels = np.array([1, 0, 1])
    t = T.f1_threshold(scores, labels)
    assert np.all(scores > t) and t > 0.49


def test_pixel_thresholds():
    rng = np.random.default_rng(3)
    good_maps = rng.random((4, 16, 16))
    assert T.pixel_threshold(good_maps, 0.9) == pytest.approx(np.quantile(good_maps, 0.9))
    maps = rng.random((4, 16, 16)) * 0.5
    masks = np.zeros(maps.shape, bool)
    masks[:, 4:8, 4:8] = True
    maps[masks] += 0.6
    t = T.f1_pixel_threshold(maps, masks)
    assert 0.5 <= t < 0.6 and np.array_equal(maps > t, masks)


def test_calibrate_quantile_and_f1():
    good = np.linspace(0, 1, 101)
    out = T.calibrate(good, quantile=0.95)
    assert out == {"image": pytest.approx(0.95), "pixel": None, "method": "quantile", "quantile": 0.95, "n_good": 101}
    out = T.calibrate(good, defect_scores=np.array([2.0, 3.0]), good_maps=np.zeros((2, 4, 4)))
    assert out["method"] == "f1" and out["image"] == pytest.approx(1.5) and out["pixel"] == 0.0
    defect_maps = np.zeros((1, 4, 4))
    defect_maps[0, 0, 0] = 1.0
    out = T.calibrate(good, good_maps=np.zeros((2, 4, 4)), defect_maps=defect_maps, defect_masks=defect_maps > 0)
    assert 0.0 <= out["pixel"] < 1.0


def test_errors_are_readable():
    with pytest.raises(ValueError, match="good_scores is empty"):
        T.quantile_threshold(np.array([]))
    with pytest.raises(ValueError, match="q must be in"):
        T.quantile_threshold(np.ones(3), 1.5)
    with pytest.raises(ValueError, match="both good"):
        T.f1_threshold(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        T.calibrate(np.array([0.1, np.nan]))


def test_reference_map_is_the_good_mean_plus_a_floor():
    from eval.threshold import reference_map

    maps = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 3.0)])
    maps[:, 0, 0] = 0.0  # a pixel no good image has residual at: the floor keeps it from dividing by 0
    ref = reference_map(maps, floor=0.1)
    mean = maps.mean(axis=0)
    assert ref.shape == (2, 3) and ref.dtype == np.float32
    assert np.allclose(ref, mean + 0.1 * mean.mean())
    assert ref[0, 0] == pytest.approx(0.1 * mean.mean())
    with pytest.raises(ValueError, match="good_maps"):
        reference_map(np.zeros((0, 2, 3)))


def test_held_out_normalised_divides_each_map_by_the_others_reference():
    from eval.threshold import held_out_normalised, reference_map

    rng = np.random.default_rng(0)
    maps = rng.random((4, 5, 6))
    out = held_out_normalised(maps)
    for i in range(4):
        assert np.allclose(out[i], maps[i] / reference_map(np.delete(maps, i, axis=0)), rtol=1e-6)
    assert np.allclose(held_out_normalised(maps[:1]), maps[:1] / reference_map(maps[:1]), rtol=1e-6)
