"""Decision thresholds for image scores and anomaly maps (numpy + scikit-learn).

Label rule used everywhere: ``pred_label = pred_score > threshold`` (and ``map > threshold``
for pixels). The default threshold comes from held-back good images only (a quantile of
their scores); the F1-optimal threshold is used only when labelled defects are given.
``calibrate`` returns the dict stored in the bundle (the caller adds the ``detect`` key).
Maps and masks are [M, H, W] arrays, or sequences of M arrays of different sizes (maps at native resolution).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve

MAX_PIXELS = 5_000_000
_SUBSAMPLE_SEED = 0


def _flat(values: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Every value of an array, or of a sequence of arrays of different shapes, in order -> [P]."""
    if not isinstance(values, np.ndarray) and len(values) and np.ndim(values[0]) >= 1:
        return np.concatenate([np.ravel(v) for v in values])
    return np.asarray(values).reshape(-1)


def _finite_1d(values: np.ndarray, name: str) -> np.ndarray:
    values = _flat(values).astype(np.float64)
    if values.size == 0:
        raise ValueError(f"{name} is empty: need at least one value to calibrate a threshold")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or inf")
    return values


def _check_quantile(q: float, name: str = "q") -> float:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {q}")
    return float(q)


def _subsample(values: np.ndarray, max_pixels: int, *others: np.ndarray) -> list[np.ndarray]:
    arrays = [values.reshape(-1), *(o.reshape(-1) for o in others)]
    if arrays[0].size <= max_pixels:
        return arrays
    idx = np.sort(np.random.default_rng(_SUBSAMPLE_SEED).choice(arrays[0].size, size=max_pixels, replace=False))
    return [a[idx] for a in arrays]


def quantile_threshold(good_scores: np.ndarray, q: float = 0.99) -> float:
    """q-quantile of good image scores [M] (linear interpolation): about (1 - q) of good images exceed it."""
    return float(np.quantile(_finite_1d(good_scores, "good_scores"), _check_quantile(q)))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising F1 of ``scores > threshold`` vs labels in {0,1} (needs both classes).

    The returned value lies halfway between the lowest score flagged and the next lower score,
    so it does not sit on a training sample; ties in F1 go to the lowest threshold.
    """
    scores = _finite_1d(scores, "scores")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.size} and {labels.size}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must contain only 0 (good) and 1 (defect)")
    if labels.min() == labels.max():
        raise ValueError("labels must contain both good (0) and defect (1) samples for an F1 threshold")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    denom = precision[:-1] + recall[:-1]
    f1 = np.divide(2 * precision[:-1] * recall[:-1], denom, out=np.zeros_like(denom), where=denom > 0)
    lowest_flagged = thresholds[int(np.argmax(f1))]  # sklearn flags score >= threshold
    below = scores[scores < lowest_flagged]
    if below.size == 0:
        return float(np.nextafter(lowest_flagged, -np.inf))
    previous = below.max()
    middle = previous + (lowest_flagged - previous) / 2.0
    return float(middle if previous <= middle < lowest_flagged else previous)


def pixel_threshold(good_maps: np.ndarray, q: float = 0.999, max_pixels: int = MAX_PIXELS) -> float:
    """q-quantile of all pixels of good maps [M,H,W]; deterministic subsample above max_pixels."""
    values = _finite_1d(good_maps, "good_maps")
    return float(np.quantile(_subsample(values, max_pixels)[0], _check_quantile(q)))


def f1_pixel_threshold(maps: np.ndarray, masks: np.ndarray, max_pixels: int = MAX_PIXELS) -> float:
    """Threshold maximising pixel F1 of ``maps > t`` vs masks [N,H,W] (needs defect and clean pixels)."""
    maps, masks = _flat(maps), _flat(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks must have the same shape, got {maps.shape} and {masks.shape}")
    values, targets = _subsample(_finite_1d(maps, "maps"), max_pixels, masks)
    return f1_threshold(values, targets.astype(np.int64))


def calibrate(good_scores: np.ndarray, good_maps: np.ndarray | None = None,
              defect_scores: np.ndarray | None = None, defect_maps: np.ndarray | None = None,
              defect_masks: np.ndarray | None = None, quantile: float = 0.99,
              pixel_quantile: float = 0.999) -> dict:
    """Thresholds from good images [M] (+ optional labelled defects) -> bundle threshold dict.

    Keys: image (float), pixel (float | None), method ('quantile' | 'f1'), quantile, n_good.
    Image: F1-optimal over good + defect scores when ``defect_scores`` is given, else the
    ``quantile`` of good scores. Pixel: F1-optimal over good maps (all clean) + defect maps
    when ``good_maps``, ``defect_maps`` and ``defect_masks`` are given, else the
    ``pixel_quantile`` of good-map pixels when ``good_maps`` is given, else None.
    """
    good_scores = _finite_1d(good_scores, "good_scores")
    _check_quantile(quantile, "quantile")
    if defect_scores is not None and np.asarray(defect_scores).size > 0:
        defects = _finite_1d(defect_scores, "defect_scores")
        scores = np.r_[good_scores, defects]
        labels = np.r_[np.zeros(good_scores.size, np.int64), np.ones(defects.size, np.int64)]
        image, method = f1_threshold(scores, labels), "f1"
    else:
        image, method = quantile_threshold(good_scores, quantile), "quantile"
    pixel = None
    if good_maps is not None and defect_maps is not None and defect_masks is not None:
        good_pixels = _flat(good_maps)
        maps = np.concatenate([good_pixels, _flat(defect_maps)])
        masks = np.concatenate([np.zeros(good_pixels.shape, bool), _flat(defect_masks).astype(bool)])
        pixel = f1_pixel_threshold(maps, masks)
    elif good_maps is not None:
        pixel = pixel_threshold(good_maps, pixel_quantile)
    return {"image": image, "pixel": pixel, "method": method, "quantile": float(quantile),
            "n_good": int(good_scores.size)}


MIN_REFERENCE_IMAGES = 20  # fewer held-back good images give a per-pixel mean too noisy to divide by
REFERENCE_FLOOR = 1.0  # the reference map's mean is added everywhere: a map value of 1 is a typical good residual


def _good_maps(good_maps: np.ndarray) -> np.ndarray:
    """good_maps as float64 [M, H, W], M >= 1, all finite; ValueError otherwise."""
    maps = np.asarray(good_maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"good_maps must be [M, H, W] with M >= 1, got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise ValueError("good_maps contains NaN or inf")
    return maps


def _reference_from_means(means: np.ndarray, floor: float) -> np.ndarray:
    """References [..., H, W] from mean maps [..., H, W]: mean + floor * its spatial mean (kept > 0)."""
    spatial = np.maximum(means.mean(axis=(-2, -1), keepdims=True), np.finfo(np.float32).tiny)
    return means + floor * spatial


def reference_map(good_maps: np.ndarray, floor: float = REFERENCE_FLOOR) -> np.ndarray:
    """Per-pixel reference [H, W] from good images' anomaly maps [M, H, W]: their mean + floor * its mean (> 0)."""
    return _reference_from_means(_good_maps(good_maps).mean(axis=0), floor).astype(np.float32)


def held_out_normalised(good_maps: np.ndarray, floor: float = REFERENCE_FLOOR) -> np.ndarray:
    """Each good map [M, H, W] divided by the reference fitted on the *other* maps (all of them if M == 1).

    Thresholds calibrated on these are unbiased: a map divided by a reference it helped to fit is
    too low at its own hot spots, which with few held-back images would set the threshold too low.
    """
    maps = _good_maps(good_maps)
    m = maps.shape[0]
    others = (maps.sum(axis=0) - maps) / (m - 1) if m > 1 else maps  # [M, H, W] leave-one-out means
    return (maps / _reference_from_means(others, floor)).astype(np.float32)
