"""`anoddpm evaluate`: score a labelled test set at the bundle's threshold (recalibrated on the fly for other
settings, ``anoddpm.detection.guard``) and write metrics and the report (``eval.metrics``, ``eval.report``)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from anoddpm.bundle import load_bundle
from anoddpm.cli.parser import detect_overrides, layout_overrides
from anoddpm.data.datasets import labelled_test_arrays
from anoddpm.data.imageio import IMAGE_SUFFIXES, image_hw
from anoddpm.detection.guard import calibrated_detector
from anoddpm.detection.tiling import resolution
from anoddpm.platform.atomic import out_folder
from anoddpm.platform.device import resolve_device
from eval.metrics import compute_metrics
from eval.overlays import CLEAR_QUANTILE
from eval.report import decisions, write_report


def evaluate_command(args: argparse.Namespace) -> int:
    """`anoddpm evaluate`: score the test set, write metrics + report into --out; returns the exit code."""
    out_folder(args.out)
    device = resolve_device(args.device)
    bundle = load_bundle(args.model, map_location=device)
    bundle = replace(bundle, cfg=bundle.cfg.override("data", **layout_overrides(args)))  # folder names of --data
    root = Path(args.data)
    test = labelled_test_arrays(bundle.cfg, root, args.category)
    view, threshold, source = calibrated_detector(bundle, device, args.batch_size, detect_overrides(args),
                                                      "evaluate", data=root, category=args.category,
                                                      calibrate_missing=True)
    scored = view.score_set(test["images"], device, keep_reconstructions=True, desc="evaluate")
    image_t, pixel_t = float(threshold["image"]), threshold.get("pixel")
    metrics = compute_metrics(scored.scores, test["labels"], scored.maps, test["masks"],
                              image_threshold=image_t, pixel_threshold=pixel_t, has_mask=test["has_mask"])
    written = write_report(
        args.out, metrics=metrics, scores=scored.scores, labels=test["labels"],
        defect_types=test["defect_types"], paths=test["paths"], threshold=image_t, pixel_threshold=pixel_t,
        seconds_per_image=scored.seconds_per_image, per_image={"name": test["names"]}, inputs=test["images"],
        reconstructions=scored.reconstructions, maps=scored.maps, masks=test["masks"], has_mask=test["has_mask"],
        overlay_aspects=_file_aspects(bundle.cfg, test["paths"]), overlay_clear=_clear_level(threshold),
        extra={"model": str(args.model), "data": str(root), "category": args.category,
               "detect": asdict(view.cfg.detect), "resolution": resolution(view.cfg), "device": str(device),
               "calibration": _without_scores(threshold), "threshold_source": source})
    summary = json.loads(written["metrics.json"].read_text())
    _print_summary(metrics, image_t, scored.seconds_per_image, len(test["paths"]))
    print(f"  {decisions(summary)}")
    _print_per_type(summary)
    if summary["n_defect_without_mask"]:
        print(f"  {summary['n_defect_without_mask']} defect images have no mask: "
              + ("pixel metrics leave them out" if metrics["pixel_auroc"] is not None
                 else "pixel metrics are absent (no defect image has a mask)"))
    print(f"report: {Path(written['index.html']).resolve()}")
    return 0


def _clear_level(threshold: dict[str, Any]) -> float | None:
    """Where overlays turn transparent: the calibration's held-back good maps' CLEAR_QUANTILE pixel quantile
    (None for calibrations older than the cache: the report then uses the good test images)."""
    return ((threshold.get("good_cache") or {}).get("pixel_quantiles") or {}).get(str(CLEAR_QUANTILE))


def _without_scores(threshold: dict[str, Any]) -> dict[str, Any]:
    """The calibration for metrics.json: its cached good scores (up to a thousand numbers) left out."""
    cache = threshold.get("good_cache")
    if not cache:
        return threshold
    return {**threshold, "good_cache": {k: v for k, v in cache.items() if k != "scores"}}


def _file_aspects(cfg: Any, paths: list[str]) -> list[float]:
    """Per test image, how much to stretch its rows so a squashed S x S input (resize policy ``resize``) is shown in
    its file's proportions (H / W); 1 for the other policies, tiling and volumes, whose geometry keeps them."""
    d = cfg.data
    if d.resize_policy != "resize" or d.tile_size:
        return [1.0] * len(paths)
    aspects = []
    for path in paths:
        height, width = image_hw(path) if Path(path).suffix.lower() in IMAGE_SUFFIXES else (1, 1)
        aspects.append(height / width)
    return aspects


def _print_per_type(summary: dict) -> None:
    """One line per defect type: image AUROC, escape rate at the threshold, pixel AUROC and its share of the
    defect pixels."""
    pixel, share = summary.get("per_type_pixel_auroc", {}), summary.get("defect_pixel_share", {})
    escapes = summary["per_type_escape_rate"]
    for name, image in summary["per_type_image_auroc"].items():
        parts = [f"image AUROC {'n/a' if image is None else f'{image:.4f}'}"]
        if escapes.get(name) is not None:
            parts.append(f"escapes {100 * escapes[name]:.1f} %")
        if pixel.get(name) is not None:
            parts.append(f"pixel AUROC {pixel[name]:.4f} ({100 * share[name]:.0f} % of defect pixels)")
        print(f"  {name}: {', '.join(parts)}")


def _print_summary(metrics: dict, threshold: float, seconds: float, n: int) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{n} images: image AUROC {fmt(metrics['image_auroc'])}, pixel AUROC {fmt(metrics['pixel_auroc'])}, "
          f"AUPRO {fmt(metrics['aupro'])}, image F1-max {fmt(metrics['image_f1_max'])}, "
          f"threshold {threshold:.6g}, {seconds:.4f} s/image")
