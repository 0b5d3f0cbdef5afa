"""Metrics agree with scikit-learn, hand-computed AUPRO/Dice/IoU values and a brute-force PRO curve."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from eval import metrics as M


def _random_set(seed=0, n=12, size=16):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 5, 2)
        masks[i, y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = True
    maps = rng.random((n, size, size)).astype(np.float32) + 0.7 * masks
    scores = maps.reshape(n, -1).max(1) + 0.1 * rng.standard_normal(n)
    return scores, labels, maps, masks


def _brute_aupro(maps, masks, limit):
    """Threshold loop + segment-by-segment clipped trapezoids: an independent reference."""
    regions, count = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3)), ((1, 1), (0, 0), (0, 0))))
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[~masks].mean())
        pros.append(np.mean([pred[regions == r].mean() for r in range(1, count + 1)]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= limit or x1 == x0:
            continue
        x_end = min(x1, limit)
        y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        area += (x_end - x0) * (y0 + y_end) / 2
    return area / limit


def test_image_metrics_match_sklearn():
    scores, labels, _, _ = _random_set(1, n=40)
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert M.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_f1_max_equals_best_threshold_by_brute_force():
    scores, labels, _, _ = _random_set(2, n=30)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert M.image_f1_max(scores, labels) == pytest.approx(best)


def test_pixel_auroc_matches_sklearn_and_subsample_is_deterministic():
    _, _, maps, masks = _random_set(3)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(maps, masks) == pytest.approx(exact)
    sub = M.pixel_auroc(maps, masks, max_pixels=1500)
    assert sub == M.pixel_auroc(maps, masks, max_pixels=1500)
    assert sub != pytest.approx(exact, abs=1e-9)
    assert sub == pytest.approx(exact, abs=0.05)


def test_aupro_hand_computed():
    # one region (2 px) in image 1; 6 clean pixels. Sorted: 0.9 R, 0.6 bg, 0.5 R, then clean.
    maps = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.9, 0.5, 0.05, 0.6]]])
    masks = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 0]]], bool)
    fpr, pro = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr[:4], [0, 0, 1 / 6, 1 / 6])
    np.testing.assert_allclose(pro[:4], [0, 0.5, 0.5, 1.0])
    assert M.aupro(maps, masks) == pytest.approx((0.5 / 6 + (0.3 - 1 / 6)) / 0.3)
    assert M.aupro(maps, masks, fpr_limit=1 / 12) == pytest.approx(0.5)


def test_aupro_regions_weighted_equally_and_separate_per_image():
    # same position in consecutive images = two regions; the large one is fully found, the small one never
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[1, :1, :1] = True
    maps[0, :2, :2] = 1.0
    regions, count = M.label_regions(masks)
    assert count == 2
    fpr, pro = M.pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


@pytest.mark.parametrize("seed,limit", [(4, 0.3), (5, 0.3), (6, 0.05), (7, 1.0)])
def test_aupro_matches_brute_force(seed, limit):
    _, _, maps, masks = _random_set(seed, n=6, size=12)
    maps = np.round(maps, 2)  # ties between pixels
    assert M.aupro(maps, masks, limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_perfect_and_worst_maps():
    _, _, _, masks = _random_set(8)
    assert M.aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert M.aupro((~masks).astype(float), masks) == pytest.approx(0.0)
    assert M.aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15)  # one tie: diagonal, mean over [0,.3]


def test_dice_iou_hand_values_and_empty_case():
    maps = np.array([[[0.9, 0.8, 0.1, 0.7]]])
    masks = np.array([[[1, 1, 1, 0]]], bool)  # tp 2, fp 1, fn 1
    dice, iou = M.dice_iou(maps, masks, 0.5)
    assert dice == pytest.approx(4 / 6) and iou == pytest.approx(2 / 4)
    assert M.dice_iou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), 0.5) == (1.0, 1.0)
    assert M.dice_iou(maps, masks, 0.8) == pytest.approx((2 / 4, 1 / 3))  # label rule: 0.8 is not > 0.8


def test_compute_metrics_keys_and_undefined():
    scores, labels, maps, masks = _random_set(9)
    out = M.compute_metrics(scores, labels, maps, masks, image_threshold=0.9, pixel_threshold=1.0)
    assert tuple(out) == M.METRIC_KEYS
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in out.values())
    assert out["dice"] == pytest.approx(M.dice_iou(maps, masks, 1.0)[0])
    good_only = M.compute_metrics(scores[labels == 0], labels[labels == 0], maps[labels == 0], masks[labels == 0])
    assert tuple(good_only) == M.METRIC_KEYS
    assert all(good_only[k] is None for k in M.METRIC_KEYS)
    no_maps = M.compute_metrics(scores, labels)
    assert no_maps["pixel_auroc"] is None and no_maps["image_auroc"] == pytest.approx(out["image_auroc"])


def test_per_type_auroc():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.15, 0.3])
    labels = np.array([0, 0, 1, 1, 1, 1])
    types = ["good", "good", "crack", "crack", "hole", "hole"]
    out = M.per_type_auroc(scores, labels, types)
    assert out == {"crack": 1.0, "hole": pytest.approx(roc_auc_score([0, 0, 1, 1], [0.1, 0.2, 0.15, 0.3]))}


def test_per_type_pixel_auroc_and_defect_pixel_share():
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.9, 0.0], [0.0, 0.0]], [[0.15, 0.0], [0.0, 0.0]]])
    masks = np.array([[[0, 0], [0, 0]], [[1, 0], [0, 0]], [[1, 1], [0, 0]]], bool)
    types = ["good", "a", "b"]
    # b: 0.15 beats 6 of the 9 defect-free pixels, 0.0 ties with 5 of them -> (6 + 2.5) / 18
    assert M.per_type_pixel_auroc(maps, masks, types) == {"a": 1.0, "b": pytest.approx(8.5 / 18)}
    assert M.defect_pixel_share(masks, types) == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3)}
    assert M.defect_pixel_share(masks[:1], types[:1]) == {}
    with pytest.raises(ValueError, match="one entry per map"):
        M.per_type_pixel_auroc(maps, masks, types[:2])


def test_pixel_auroc_is_the_share_weighted_mean_of_the_per_type_pixel_aurocs():
    rng = np.random.default_rng(3)
    masks = rng.random((6, 8, 8)) < 0.2
    masks[:2] = False
    maps = rng.random((6, 8, 8)) + 0.5 * masks * rng.random((6, 1, 1))
    types = ["good", "good", "a", "b", "b", "c"]
    by_type, share = M.per_type_pixel_auroc(maps, masks, types), M.defect_pixel_share(masks, types)
    assert sum(share.values()) == pytest.approx(1.0)
    assert sum(share[t] * by_type[t] for t in share) == pytest.approx(M.pixel_auroc(maps, masks))
    sub = M.per_type_pixel_auroc(maps, masks, types, max_pixels=40)  # each side subsampled, fixed seed
    assert sub == M.per_type_pixel_auroc(maps, masks, types, max_pixels=40) and sub != by_type
    assert all(abs(sub[t] - by_type[t]) < 0.2 for t in by_type)


def test_input_errors():
    with pytest.raises(ValueError, match="same length"):
        M.image_auroc(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        M.compute_metrics(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="labels"):
        M.image_auroc(np.zeros(2), np.array([0, 2]))
    with pytest.raises(ValueError, match="masks"):
        M.aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))
