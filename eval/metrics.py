"""Anomaly-detection metrics on plain numpy arrays (scikit-learn for ROC/PR, scipy for regions).

Conventions (shared with threshold.py and report.py):

* ``scores`` [N] float image scores (higher = more anomalous), ``labels`` [N] in {0, 1}
  (1 = defect), ``maps`` [N, H, W] float anomaly maps, ``masks`` [N, H, W] bool ground truth
  (all False for good images). Maps at native resolution (tiling) differ in size: ``maps`` and ``masks`` may
  then be sequences of N arrays [H_i, W_i], each mask the shape of its map; pixels count image after image.
* Label rule: ``pred = score > threshold`` for images and ``pred = map > threshold`` for pixels.
* A metric that is undefined on the given data is ``None``, never NaN: AUROC needs both
  classes; AP and F1-max need at least one positive; pixel metrics need ``maps``/``masks``;
  AUPRO also needs at least one non-defect pixel.
* Pixel AUROC and pixel F1-max use at most ``max_pixels`` pixels, drawn uniformly without
  replacement with a fixed seed, so the result is deterministic (exact below the limit).
  AUPRO, Dice and IoU always use every pixel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

MAX_PIXELS = 5_000_000
METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "dice", "iou")
_SUBSAMPLE_SEED = 0


def _as_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.size} and {labels.size}")
    if scores.size == 0:
        raise ValueError("scores is empty: need at least one image")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contains NaN or inf")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must contain only 0 (good) and 1 (defect)")
    return scores, labels.astype(np.int64)


@dataclass(frozen=True)
class _Pixels:
    """Every pixel of N maps, image after image: values [P] float, targets [P] bool, image index [P] int."""

    values: np.ndarray
    targets: np.ndarray
    image: np.ndarray
    masks: list[np.ndarray]  # the N masks [H_i, W_i]

    @property
    def n_images(self) -> int:
        return len(self.masks)


def _as_maps_masks(maps: np.ndarray | Sequence[np.ndarray], masks: np.ndarray | Sequence[np.ndarray]) -> _Pixels:
    if isinstance(maps, np.ndarray) or isinstance(masks, np.ndarray):
        maps, masks = np.asarray(maps), np.asarray(masks).astype(bool)
        if maps.ndim != 3 or maps.shape != masks.shape:
            raise ValueError(f"maps and masks must both be [N, H, W] of equal shape, got {maps.shape} and {masks.shape}")
    maps = [np.asarray(m) for m in maps]
    masks = [np.asarray(m).astype(bool) for m in masks]
    if len(maps) != len(masks) or any(a.ndim != 2 or a.shape != b.shape for a, b in zip(maps, masks)):
        raise ValueError(f"maps and masks must be N maps [H_i, W_i] and N masks of the same shapes, got "
                         f"{[a.shape for a in maps][:3]}... and {[b.shape for b in masks][:3]}...")
    values = np.concatenate([m.reshape(-1) for m in maps]) if maps else np.zeros(0)
    if values.size == 0:
        raise ValueError("maps is empty: need at least one pixel")
    if not np.all(np.isfinite(values)):
        raise ValueError("maps contains NaN or inf")
    image = np.repeat(np.arange(len(maps)), [m.size for m in maps])
    return _Pixels(values, np.concatenate([m.reshape(-1) for m in masks]), image, masks)


def _subsample_index(size: int, max_pixels: int) -> np.ndarray | slice:
    """Which of `size` flattened pixels to use: all of them, or above max_pixels a fixed-seed uniform
    subsample in their order."""
    if size <= max_pixels:
        return slice(None)
    return np.sort(np.random.default_rng(_SUBSAMPLE_SEED).choice(size, size=max_pixels, replace=False))


def _subsample_values(values: np.ndarray, max_pixels: int) -> np.ndarray:
    values = values.reshape(-1)
    return values[_subsample_index(values.size, max_pixels)]


def _subsample(pixels: _Pixels, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    index = _subsample_index(pixels.values.size, max_pixels)
    return pixels.values[index], pixels.targets[index].astype(np.int64)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def _f1_max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.max() == 0:
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC of image scores [N] vs labels [N] in {0,1}; None when only one class is present."""
    return _auroc(*_as_scores_labels(scores, labels))


def image_ap(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision of image scores [N]; None without defect images."""
    scores, labels = _as_scores_labels(scores, labels)
    return float(average_precision_score(labels, scores)) if labels.max() == 1 else None


def image_f1_max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Best F1 over all image thresholds, in [0, 1]; None without defect images."""
    return _f1_max(*_as_scores_labels(scores, labels))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, max_pixels: int = MAX_PIXELS) -> float | None:
    """ROC AUC over pixels of maps [N,H,W] vs masks [N,H,W]; deterministic subsample above max_pixels."""
    return _auroc(*_subsample(_as_maps_masks(maps, masks), max_pixels))


def pixel_f1_max(maps: np.ndarray, masks: np.ndarray, max_pixels: int = MAX_PIXELS) -> float | None:
    """Best pixel F1 over all map thresholds; None without defect pixels."""
    return _f1_max(*_subsample(_as_maps_masks(maps, masks), max_pixels))


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions of masks [N,H,W] (8-connectivity, per image) -> (ids [N,H,W], count); 0 = none."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # connect within an image only, never across the batch axis
    regions, count = ndimage.label(np.asarray(masks, dtype=bool), structure=structure)
    return regions, int(count)


def _region_ids(pixels: _Pixels) -> tuple[np.ndarray, int]:
    """Connected defect region of every pixel [P] (0 = none; 8-connectivity within each image) and their count."""
    ids, count = [], 0
    for mask in pixels.masks:
        regions, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        ids.append(np.where(regions > 0, regions + count, 0).reshape(-1))
        count += int(n)
    return np.concatenate(ids), count


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve -> (fpr, pro), both [K] non-decreasing from (0, 0) to (1, 1).

    At each distinct map value t (pixel predicted defect when map >= t), fpr is the share of
    non-defect pixels (over all images) above t and pro is the mean, over ground-truth regions,
    of the share of each region's pixels above t. One sort instead of a pass per threshold.
    """
    pixels = _as_maps_masks(maps, masks)
    regions, count = _region_ids(pixels)
    n_background = int((~pixels.targets).sum())
    if count == 0 or n_background == 0:
        raise ValueError("the PRO curve needs at least one defect pixel and one non-defect pixel in masks")
    values = pixels.values
    order = np.argsort(values)[::-1]  # order inside a run of ties does not matter (see below)
    sorted_values = values[order]
    sorted_regions = regions[order]
    region_weight = np.zeros(count + 1)
    region_weight[1:] = 1.0 / (count * np.bincount(regions, minlength=count + 1)[1:])
    fpr = np.cumsum(sorted_regions == 0) / n_background
    pro = np.cumsum(region_weight[sorted_regions])
    # keep the last pixel of every run of equal values: a threshold cannot split ties
    last_of_run = np.flatnonzero(np.r_[sorted_values[1:] != sorted_values[:-1], True])
    return np.r_[0.0, fpr[last_of_run]], np.r_[0.0, np.minimum(pro[last_of_run], 1.0)]


def area_under_curve(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area of y over x in [x[0], x_limit] for non-decreasing x, y interpolated at x_limit."""
    k = int(np.searchsorted(x, x_limit, side="right"))
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_limit:
        y_at = ys[-1] + (y[k] - ys[-1]) * (x_limit - xs[-1]) / (x[k] - xs[-1])
        xs, ys = np.r_[xs, x_limit], np.r_[ys, y_at]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit -> [0, 1]; None if undefined."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    targets = _as_maps_masks(maps, masks).targets
    if not targets.any() or targets.all():
        return None
    fpr, pro = pro_curve(maps, masks)
    return area_under_curve(fpr, pro, fpr_limit) / fpr_limit


def dice_iou(maps: np.ndarray, masks: np.ndarray, threshold: float) -> tuple[float, float]:
    """(Dice, IoU) of ``maps > threshold`` vs masks, pooled over all pixels of all images.

    Both are 1.0 when prediction and ground truth are both empty (nothing to find, nothing found).
    """
    pixels = _as_maps_masks(maps, masks)
    pred, masks = pixels.values > threshold, pixels.targets
    tp = int(np.count_nonzero(pred & masks))
    fp = int(np.count_nonzero(pred & ~masks))
    fn = int(np.count_nonzero(~pred & masks))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def per_type_auroc(scores: np.ndarray, labels: np.ndarray, defect_types: Sequence[str]) -> dict[str, float | None]:
    """Image AUROC of each defect type against all good images -> {type: auroc}; good is not a key."""
    scores, labels = _as_scores_labels(scores, labels)
    types = np.asarray(list(defect_types), dtype=object)
    if types.shape != scores.shape:
        raise ValueError(f"defect_types must have one entry per score, got {types.size} for {scores.size}")
    good = labels == 0
    result: dict[str, float | None] = {}
    for name in sorted({str(t) for t in types[labels == 1]}):
        keep = good | ((types == name) & (labels == 1))
        result[name] = _auroc(scores[keep], labels[keep])
    return result


def _defect_types_per_image(defect_types: Sequence[str], n: int) -> np.ndarray:
    types = np.asarray(list(defect_types), dtype=object)
    if types.shape != (n,):
        raise ValueError(f"defect_types must have one entry per map, got {types.size} for {n}")
    return types


def per_type_pixel_auroc(maps: np.ndarray, masks: np.ndarray, defect_types: Sequence[str],
                         max_pixels: int = MAX_PIXELS) -> dict[str, float | None]:
    """Pixel AUROC of each defect type's mask pixels against every defect-free pixel of all images -> {type: auroc}.

    maps [N,H,W], masks [N,H,W], defect_types [N]; types without mask pixels are not keys. Each side is
    subsampled to at most ``max_pixels`` with the fixed seed, as for ``pixel_auroc``.
    """
    pixels = _as_maps_masks(maps, masks)
    types = _defect_types_per_image(defect_types, pixels.n_images)
    values, masks = pixels.values, pixels.targets
    normal = _subsample_values(values[~masks], max_pixels)
    result: dict[str, float | None] = {}
    for name in sorted({str(t) for t in types[[bool(m.any()) for m in pixels.masks]]}):
        of_type = masks & (types == name)[pixels.image]
        defect = _subsample_values(values[of_type], max_pixels)
        targets = np.concatenate([np.zeros(normal.size, np.int64), np.ones(defect.size, np.int64)])
        result[name] = _auroc(np.concatenate([normal, defect]), targets)
    return result


def defect_pixel_share(masks: np.ndarray, defect_types: Sequence[str]) -> dict[str, float]:
    """Share of all defect pixels that each defect type holds, in [0, 1] -> {type: share}; pixel AUROC weighs types by it."""
    types = _defect_types_per_image(defect_types, len(masks))
    per_image = np.array([int(np.count_nonzero(m)) for m in masks], dtype=np.int64)
    total = int(per_image.sum())
    if total == 0:
        return {}
    return {name: float(per_image[types == name].sum() / total)
            for name in sorted({str(t) for t in types[per_image > 0]})}


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float,
                    defect_types: Sequence[str] | None = None) -> dict[str, Any]:
    """What the threshold decides on a labelled set (label rule ``score > threshold``) -> dict with
    ``false_rejects`` (good images flagged), ``false_reject_rate`` (of the good images), ``escapes`` (defect images
    passed), ``escape_rate`` (of the defect images), ``per_type_escape_rate`` {defect type: rate}; a rate is None
    when its group is empty. scores [N], labels [N] in {0,1}, defect_types [N] (optional)."""
    scores, labels = _as_scores_labels(scores, labels)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    flagged = scores > float(threshold)
    good, defect = labels == 0, labels == 1
    rejects, escapes = int(np.count_nonzero(flagged & good)), int(np.count_nonzero(~flagged & defect))
    result: dict[str, Any] = {
        "false_rejects": rejects, "false_reject_rate": rejects / int(good.sum()) if good.any() else None,
        "escapes": escapes, "escape_rate": escapes / int(defect.sum()) if defect.any() else None,
        "per_type_escape_rate": {}}
    if defect_types is not None:
        types = _defect_types_per_image(defect_types, scores.size)
        for name in sorted({str(t) for t in types[defect]}):
            of_type = defect & (types == name)
            result["per_type_escape_rate"][name] = float(np.count_nonzero(~flagged & of_type) / of_type.sum())
    return result


def pixel_roc_curve(maps: np.ndarray | Sequence[np.ndarray], masks: np.ndarray | Sequence[np.ndarray],
                    max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel ROC curve -> (fpr, tpr) [K] over the same (subsampled) pixels as ``pixel_auroc``; needs both classes."""
    values, targets = _subsample(_as_maps_masks(maps, masks), max_pixels)
    if targets.min() == targets.max():
        raise ValueError("the pixel ROC curve needs defect and defect-free pixels in masks")
    fpr, tpr, _ = roc_curve(targets, values)
    return fpr, tpr


def pixel_operating_point(maps: np.ndarray | Sequence[np.ndarray], masks: np.ndarray | Sequence[np.ndarray],
                          threshold: float) -> dict[str, float | None]:
    """At ``map > threshold`` over every pixel: ``fpr`` (share of defect-free pixels flagged), ``tpr`` (of defect
    pixels) and ``pro`` (mean share flagged of each connected defect region) -> dict; None where undefined."""
    pixels = _as_maps_masks(maps, masks)
    flagged = pixels.values > float(threshold)
    background = ~pixels.targets
    regions, count = _region_ids(pixels)
    pro = None
    if count:
        per_region = np.bincount(regions, weights=flagged, minlength=count + 1)[1:]
        pro = float(np.mean(per_region / np.bincount(regions, minlength=count + 1)[1:]))
    return {"fpr": float(flagged[background].mean()) if background.any() else None,
            "tpr": float(flagged[pixels.targets].mean()) if pixels.targets.any() else None, "pro": pro}


def select(items: np.ndarray | Sequence[np.ndarray], keep: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """The entries of an [N, ...] array or a sequence of N arrays where keep [N] bool is True."""
    if isinstance(items, np.ndarray):
        return items[keep]
    return [items[i] for i in np.flatnonzero(keep)]


def with_masks(labels: np.ndarray, has_mask: np.ndarray | None) -> np.ndarray | None:
    """Which images pixel metrics use: [N] bool of those whose mask is known (all when `has_mask` is None),
    or None when no defect image has a mask (pixel metrics are then absent, not zero)."""
    labels = np.asarray(labels).reshape(-1)
    keep = np.ones(labels.size, bool) if has_mask is None else np.asarray(has_mask, bool).reshape(-1)
    if keep.shape != labels.shape:
        raise ValueError(f"has_mask must have one entry per image, got {keep.size} for {labels.size}")
    return keep if keep[labels == 1].any() else None


def compute_metrics(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None = None,
                    masks: np.ndarray | None = None, image_threshold: float | None = None,
                    pixel_threshold: float | None = None, max_pixels: int = MAX_PIXELS,
                    fpr_limit: float = 0.3, has_mask: np.ndarray | None = None) -> dict[str, float | None]:
    """All headline metrics -> dict with exactly ``METRIC_KEYS`` (float, or None when undefined).

    scores [N], labels [N] in {0,1}; maps [N,H,W] float and masks [N,H,W] bool are optional
    (pixel metrics are None without them). ``has_mask`` [N] bool marks the images whose mask is
    known (False: a defect image labelled without a mask); pixel metrics use only those, and are
    None when no defect image has one. Dice/IoU use ``maps > pixel_threshold``; without a
    pixel threshold they fall back to ``image_threshold`` (image scores are reductions of the
    map, so both live in map units), and are None when neither is given.
    """
    scores, labels = _as_scores_labels(scores, labels)
    keep = with_masks(labels, has_mask)
    result: dict[str, float | None] = {
        "image_auroc": _auroc(scores, labels),
        "image_ap": float(average_precision_score(labels, scores)) if labels.max() == 1 else None,
        "pixel_auroc": None, "aupro": None,
        "image_f1_max": _f1_max(scores, labels),
        "pixel_f1_max": None, "dice": None, "iou": None,
    }
    if maps is None or masks is None or keep is None:
        return result
    if len(maps) != scores.size:
        raise ValueError(f"maps has {len(maps)} images but scores has {scores.size}")
    if not keep.all():
        maps, masks = select(maps, keep), select(masks, keep)
    pixels = _as_maps_masks(maps, masks)
    values, targets = _subsample(pixels, max_pixels)
    result["pixel_auroc"] = _auroc(values, targets)
    result["pixel_f1_max"] = _f1_max(values, targets)
    result["aupro"] = aupro(maps, masks, fpr_limit)
    threshold = pixel_threshold if pixel_threshold is not None else image_threshold
    if threshold is not None:
        result["dice"], result["iou"] = dice_iou(maps, masks, float(threshold))
    return result
