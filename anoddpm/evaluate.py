"""`anoddpm calibrate` and `anoddpm evaluate`: thresholds into the bundle, metrics into a report.

Calibration scores the held-back good validation images (the same deterministic split as
training: ``load_training_data`` with the bundle's config and seed) and stores the threshold
dict in model.pt. ``--method quantile`` (default) takes a quantile of good scores (image) and of
good-map pixels (pixel); ``--method f1`` also scores the labelled test set and picks the
F1-optimal thresholds (this tunes on the test set: report metrics from another set).

Evaluation scores the test set at the bundle's threshold. A bundle without a threshold, or one
calibrated with other detection settings than the ones asked for, is calibrated on the fly on
the validation split (the bundle is not changed) and the report says so.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anoddpm.cli import detect_overrides
from anoddpm.scoring_loop import ScoredSet, batched, score_component_maps, score_images, stack_if_same
from anoddpm.settings_guard import calibrated_detector, same_detect_settings  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def _load(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, torch.device]:
    """(bundle, detector in eval mode with the command-line detect overrides, device)."""
    from anoddpm.bundle import load_bundle
    from anoddpm.detector import Detector
    from anoddpm.device import resolve_device
    from anoddpm.tiled import inspection_detector

    device = resolve_device(args.device)
    bundle = load_bundle(args.model, map_location=device)
    overrides = {k: v for k, v in detect_overrides(args).items() if v is not None}
    detector = Detector.from_bundle(bundle, device, **overrides).eval()
    return bundle, inspection_detector(detector, args.batch_size), device


def detect_dict(detector: torch.nn.Module) -> dict[str, Any]:
    """The DetectConfig the detector runs with, as a plain dict."""
    return asdict(detector.cfg.detect)


def training_root(bundle: Any, data: str | None, category: str | None) -> tuple[Path, str | None]:
    if data is not None:
        return Path(data), category
    root = bundle.fingerprint.get("root")
    if not root:
        raise ValueError(f"{bundle.path} records no training data root; pass --data ROOT [--category NAME]")
    recorded = bundle.fingerprint.get("category")
    if category is None and recorded and (Path(root) / recorded).is_dir():
        category = recorded  # ROOT/category layout; otherwise ROOT was the category or image folder itself
    return Path(root), category


def score_validation(bundle: Any, detector: torch.nn.Module, root: Path, category: str | None,
                     device: torch.device, batch_size: int) -> ScoredSet:
    """Score the held-back good images of the training split (same split as training); fits the map reference."""
    from anoddpm.data import load_training_data

    train_ds, val_ds, _ = load_training_data(bundle.cfg, root, category, bundle.cfg.train.seed)
    if len(val_ds) == 0:
        raise ValueError(f"no held-back validation images under {root} (category {category}) to calibrate on")
    return score_good_and_fit_reference(detector, val_ds, device, batch_size, bank_images=train_ds)


def score_good_and_fit_reference(detector: Any, good_images: Any, device: torch.device, batch_size: int,
                                 bank_images: Any = None) -> ScoredSet:
    """Score held-back good images [C, S, S] and fit the detector's map reference (``detect.map_reference``).

    'nearest_good': the reference bank is fitted on `bank_images` (the training split, [C, S, S] in [0, 1];
    augmentation is not applied) when they are at least MIN_REFERENCE_IMAGES, and the good images are scored
    against it (they are not in it: unbiased thresholds). 'good_mean': with at least MIN_REFERENCE_IMAGES good
    images, the reference map is fitted on them and each image's map is divided by the reference fitted on
    the others. Otherwise the plain maps and no reference. Tiled (``anoddpm.tiled``): both references are
    fitted on the tiles of `bank_images`. A 'feature_memory' component first gets its bank of good patch features
    from `bank_images` (the held-back images are not in it either).
    """
    from anoddpm.detector import combine_component_maps
    from anoddpm.tiled import TiledDetector, as_tiles, fit_tiled_references
    from eval.scoring import image_score
    from eval.threshold import MIN_REFERENCE_IMAGES, held_out_normalised

    if isinstance(detector, TiledDetector):  # per-tile references from the training split's tiles
        detector.detector.set_component_scale(None)
        fit_tiled_references(detector, bank_images, device, batch_size)
        if _scales_components(detector.detector):
            fit_component_scale(detector.detector, as_tiles(good_images, detector.detector.cfg), device, batch_size)
        return score_images(detector, good_images, device, batch_size, desc="validation")
    det = detector.cfg.detect
    detector.set_map_reference(None)
    detector.set_reference_bank(None)
    detector.set_component_scale(None)
    if "feature_memory" in detector.components:
        _fit_feature_memory(detector, bank_images, device)
    if det.map_reference == "nearest_good":
        _fit_reference_bank(detector, bank_images, device, batch_size)
    if det.map_reference != "good_mean":
        if _scales_components(detector):
            fit_component_scale(detector, good_images, device, batch_size)
        return score_images(detector, good_images, device, batch_size, desc="validation")
    # one reconstruction per image serves every component map ('fused' has two), each fitting its own reference
    components, seconds = score_component_maps(detector, good_images, device, batch_size, desc="validation")
    if len(components) < MIN_REFERENCE_IMAGES:
        log.warning("map reference: not fitted, %d held-back good images are fewer than %d; maps stay "
                    "unnormalised", len(components), MIN_REFERENCE_IMAGES)
    else:
        set_good_mean_reference(detector, components)
        referenced = detector.referenced.tolist()
        components = np.stack([held_out_normalised(components[:, k]) if referenced[k] else components[:, k]
                               for k in range(components.shape[1])], axis=1)
    if _scales_components(detector):
        detector.set_component_scale(component_scale(components.max(axis=(2, 3))))
        components = components / detector.component_scale.cpu().numpy()[None, :, None, None]
    maps = combine_component_maps(torch.from_numpy(components), det.fusion)
    scores = image_score(maps, det.score, det.topk).double().numpy()
    return ScoredSet(scores=scores, maps=maps[:, 0].numpy(), reconstructions=None, seconds_per_image=seconds)


def _scales_components(detector: Any) -> bool:
    """True when the detector's maps are fused by 'max' and so need each component in comparable units."""
    return detector.cfg.detect.fusion == "max" and len(detector.components) > 1


def component_scale(maxima: np.ndarray) -> torch.Tensor:
    """Per-image maxima [N, K] of good images' referenced component maps -> the scale of each component [K]:
    the median maximum (floored at 1e-12), so each component reads 1 at a typical good image's worst pixel."""
    return torch.from_numpy(np.maximum(np.median(maxima, axis=0), 1e-12).astype(np.float32))


def fit_component_scale(detector: Any, good_images: Any, device: torch.device, batch_size: int) -> None:
    """Fit ``component_scale`` on held-back good images [C, S, S] (or tiles) scored with the fitted references."""
    maxima, _ = score_component_maps(detector, good_images, device, batch_size, desc="component scale",
                                     reduce=lambda c: c.amax(dim=(2, 3)), referenced=True)
    detector.set_component_scale(component_scale(maxima))


def evenly_spaced(n: int) -> np.ndarray:
    """Indices of at most BANK_MAX_IMAGES evenly spaced items out of `n` (a bank's images or tiles)."""
    from eval.neighbour_reference import BANK_MAX_IMAGES

    return np.unique(np.linspace(0, n - 1, min(n, BANK_MAX_IMAGES)).round().astype(int))


def set_good_mean_reference(detector: Any, components: np.ndarray) -> None:
    """Give the detector the good_mean reference of good component maps [N, K, S, S]: each referenced component's
    ``reference_map``; a feature_memory map keeps its units (reference 1)."""
    from eval.threshold import reference_map

    referenced = detector.referenced.tolist()
    detector.set_map_reference(torch.from_numpy(np.stack([
        reference_map(components[:, k]) if referenced[k] else np.ones_like(components[0, k])
        for k in range(components.shape[1])])))


def _fit_reference_bank(detector: Any, bank_images: Any, device: torch.device, batch_size: int) -> None:
    """Give the detector the nearest_good bank of `bank_images` (>= MIN_REFERENCE_IMAGES, else a message;
    at most BANK_MAX_IMAGES of them, evenly spaced)."""
    from eval.neighbour_reference import pool_bank_maps, thumbnail_features
    from eval.threshold import MIN_REFERENCE_IMAGES

    if not bool(detector.referenced.any()):  # feature_memory alone: no map is divided by a reference
        return
    n = 0 if bank_images is None else len(bank_images)
    if n < MIN_REFERENCE_IMAGES:
        log.warning("map reference: no nearest_good bank, %d training images are fewer than %d; maps stay "
                    "unnormalised", n, MIN_REFERENCE_IMAGES)
        return
    images = _BankImages(bank_images, evenly_spaced(n))
    pooled, _ = score_component_maps(detector, images, device, batch_size, desc="reference bank", reduce=pool_bank_maps)
    features = torch.cat([thumbnail_features(torch.stack(chunk))
                          for chunk in batched((images[j] for j in range(len(images))), 256)])
    detector.set_reference_bank(features, torch.from_numpy(pooled))


def _fit_feature_memory(detector: Any, bank_images: Any, device: torch.device) -> None:
    """Give the detector its feature_memory bank: a coreset of the patch features of `bank_images` (at most
    BANK_MAX_IMAGES of them, evenly spaced)."""
    from anoddpm.feature_scoring import fit_feature_memory

    n = 0 if bank_images is None else len(bank_images)
    if n == 0:
        raise ValueError("detect.scorer uses feature_memory, which needs the training images to fit its bank; "
                         "none were given")
    images = _BankImages(bank_images, evenly_spaced(n))
    cfg = detector.cfg
    detector.set_feature_memory(fit_feature_memory(detector.backbone, cfg.backbone.pool, images,
                                                   cfg.detect.memory_size, cfg.detect.seed, device))


class _BankImages:
    """The chosen bank images as a lazy sequence of float32 [C, S, S] tensors: no copy of the whole set is held."""

    def __init__(self, dataset: Any, chosen: np.ndarray) -> None:
        self.arrays = getattr(dataset, "arrays", None)  # an ImageDataset: its stored images, without augmentation
        self.dataset, self.chosen = dataset, chosen

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, j: int) -> torch.Tensor:
        i = int(self.chosen[j])
        return torch.as_tensor(np.asarray(self.arrays[i] if self.arrays is not None else self.dataset[i],
                                          dtype=np.float32))


def fitted_reference(detector: Any) -> dict[str, Any]:
    """The detector's fitted references on the CPU as ``update_threshold`` keywords: map_reference [1, K, S, S],
    reference_bank {"features" [N, F], "maps" [N, K, s, s]}, feature_memory [M, D], component_scale [K] and the identity of the backbone
    they were computed with, backbone {"name", "sha256"}; each None when not fitted or not used."""
    from anoddpm.backbone import backbone_identity

    bank = None
    if detector.has_reference_bank:
        bank = {"features": detector.bank_features.detach().cpu(), "maps": detector.bank_maps.detach().cpu()}
    return {"map_reference": detector.map_reference.detach().cpu() if detector.has_map_reference else None,
            "reference_bank": bank,
            "feature_memory": detector.memory_bank.detach().cpu() if detector.has_feature_memory else None,
            "component_scale": detector.component_scale.detach().cpu() if detector.has_component_scale else None,
            "backbone": None if detector.backbone is None else backbone_identity(detector.cfg.backbone)}


def _test_arrays(cfg: Any, root: Path, category: str | None) -> dict[str, Any]:
    """The labelled test set as arrays: images [N,C,S,S], masks [N,S,S] bool, labels [N], types, paths
    (tiled at native resolution: lists of [C,H_i,W_i] and [H_i,W_i] when the sizes differ)."""
    from anoddpm.data import load_test_set

    samples = load_test_set(cfg, root, category)
    if len(samples) == 0:
        raise ValueError(f"no test images under {root} (category {category})")
    items = [samples[i] for i in range(len(samples))]
    loaded = [(np.asarray(s.image, dtype=np.float32), np.asarray(s.mask, dtype=bool))
              for s in tqdm(items, desc="load test set", unit="img")]
    return {
        "images": stack_if_same([image for image, _ in loaded]),
        "masks": stack_if_same([mask for _, mask in loaded]),
        "labels": np.array([int(s.label) for s in items], dtype=np.int64),
        "defect_types": [str(s.defect_type) for s in items],
        "paths": [str(s.path) for s in items],
        "names": [s.name for s in items],  # unique even where paths repeat (NFBS slices of one volume)
        "has_mask": np.array([bool(s.has_mask) for s in items], dtype=bool),
    }


def calibrate_threshold(bundle: Any, detector: torch.nn.Module, device: torch.device, batch_size: int,
                        root: Path, category: str | None, quantile: float, method: str) -> dict[str, Any]:
    """Threshold dict (image, pixel, method, quantile, n_good, detect) from the validation split (+ test set for f1)."""
    from eval.threshold import calibrate

    val = score_validation(bundle, detector, root, category, device, batch_size)
    good_scores, good_maps, defects = val.scores, val.maps, {}
    if method == "f1":
        test = _test_arrays(bundle.cfg, root, category)
        if test["labels"].min() == 1 or test["labels"].max() == 0:
            raise ValueError(f"--method f1 needs good and defect test images under {root}; found only one kind")
        scored = score_images(detector, test["images"], device, batch_size, desc="test set")
        good, bad = test["labels"] == 0, test["labels"] == 1
        good_scores = np.r_[good_scores, scored.scores[good]]
        pick = lambda values, keep: [values[i] for i in np.flatnonzero(keep)]  # noqa: E731 - arrays or lists
        good_maps = [*good_maps, *pick(scored.maps, good)]
        defects = {"defect_scores": scored.scores[bad]}
        masked = bad & test["has_mask"]  # defects labelled without a mask say nothing about pixels
        if masked.any():
            defects.update(defect_maps=pick(scored.maps, masked), defect_masks=pick(test["masks"], masked))
    elif method != "quantile":
        raise ValueError(f"--method {method!r} is not allowed; choose quantile or f1")
    threshold = calibrate(good_scores, good_maps, quantile=quantile, **defects)
    threshold["detect"] = detect_dict(detector)
    threshold["components"] = list(detector.components)
    return threshold


def calibrate_command(args: argparse.Namespace) -> int:
    """`anoddpm calibrate`: compute the threshold and write it into --model; returns the exit code."""
    from anoddpm.bundle import update_threshold

    bundle, detector, device = _load(args)
    root, category = training_root(bundle, args.data, args.category)
    quantile = args.quantile if args.quantile is not None else detector.cfg.detect.threshold_quantile
    threshold = calibrate_threshold(bundle, detector, device, args.batch_size, root, category, quantile,
                                    getattr(args, "method", "quantile"))
    update_threshold(args.model, threshold, **fitted_reference(detector))
    pixel = threshold["pixel"]
    print(f"calibrated {args.model}: image threshold {threshold['image']:.6g} ({threshold['method']}, "
          f"{threshold['n_good']} good images), pixel threshold "
          f"{'n/a' if pixel is None else f'{pixel:.6g}'}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """`anoddpm evaluate`: score the test set, write metrics + report into --out; returns the exit code."""
    from anoddpm.atomic import out_folder
    from anoddpm.bundle import load_bundle
    from anoddpm.cli import layout_overrides
    from anoddpm.device import resolve_device
    from anoddpm.tiled import resolution
    from eval.metrics import compute_metrics
    from eval.report import write_report

    out_folder(args.out)
    device = resolve_device(args.device)
    bundle = load_bundle(args.model, map_location=device)
    bundle = replace(bundle, cfg=bundle.cfg.override("data", **layout_overrides(args)))  # folder names of --data
    root = Path(args.data)
    test = _test_arrays(bundle.cfg, root, args.category)
    detector, threshold, source = calibrated_detector(bundle, device, args.batch_size, detect_overrides(args),
                                                      "evaluate", data=root, category=args.category,
                                                      calibrate_missing=True)
    scored = score_images(detector, test["images"], device, args.batch_size, keep_reconstructions=True,
                          desc="evaluate")
    image_t, pixel_t = float(threshold["image"]), threshold.get("pixel")
    metrics = compute_metrics(scored.scores, test["labels"], scored.maps, test["masks"],
                              image_threshold=image_t, pixel_threshold=pixel_t, has_mask=test["has_mask"])
    written = write_report(
        args.out, metrics=metrics, scores=scored.scores, labels=test["labels"],
        defect_types=test["defect_types"], paths=test["paths"], threshold=image_t, pixel_threshold=pixel_t,
        seconds_per_image=scored.seconds_per_image, per_image={"name": test["names"]}, inputs=test["images"],
        reconstructions=scored.reconstructions, maps=scored.maps, masks=test["masks"], has_mask=test["has_mask"],
        overlay_aspects=_file_aspects(bundle.cfg, test["paths"]),
        extra={"model": str(args.model), "data": str(root), "category": args.category,
               "detect": detect_dict(detector), "resolution": resolution(detector.cfg), "device": str(device),
               "calibration": threshold, "threshold_source": source})
    _print_summary(metrics, image_t, scored.seconds_per_image, len(test["paths"]), written["index.html"])
    summary = json.loads(written["metrics.json"].read_text())
    _print_per_type(summary)
    if summary["n_defect_without_mask"]:
        print(f"  {summary['n_defect_without_mask']} defect images have no mask: "
              + ("pixel metrics leave them out" if metrics["pixel_auroc"] is not None
                 else "pixel metrics are absent (no defect image has a mask)"))
    return 0


def _file_aspects(cfg: Any, paths: list[str]) -> list[float]:
    """Per test image, how much to stretch its rows so a squashed S x S input (resize policy ``resize``) is shown in
    its file's proportions (H / W); 1 for the other policies, tiling and volumes, whose geometry keeps them."""
    from anoddpm.imageio import IMAGE_SUFFIXES, image_hw

    d = cfg.data
    if d.resize_policy != "resize" or d.tile_size:
        return [1.0] * len(paths)
    aspects = []
    for path in paths:
        height, width = image_hw(path) if Path(path).suffix.lower() in IMAGE_SUFFIXES else (1, 1)
        aspects.append(height / width)
    return aspects


def _print_per_type(summary: dict) -> None:
    """One line per defect type: image AUROC, pixel AUROC and its share of the defect pixels."""
    pixel, share = summary.get("per_type_pixel_auroc", {}), summary.get("defect_pixel_share", {})
    for name, image in summary["per_type_image_auroc"].items():
        parts = [f"image AUROC {'n/a' if image is None else f'{image:.4f}'}"]
        if pixel.get(name) is not None:
            parts.append(f"pixel AUROC {pixel[name]:.4f} ({100 * share[name]:.0f} % of defect pixels)")
        print(f"  {name}: {', '.join(parts)}")


def _print_summary(metrics: dict, threshold: float, seconds: float, n: int, index: Path) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{n} images: image AUROC {fmt(metrics['image_auroc'])}, pixel AUROC {fmt(metrics['pixel_auroc'])}, "
          f"AUPRO {fmt(metrics['aupro'])}, image F1-max {fmt(metrics['image_f1_max'])}, "
          f"threshold {threshold:.6g}, {seconds:.4f} s/image")
    print(f"report: {Path(index).resolve()}")
