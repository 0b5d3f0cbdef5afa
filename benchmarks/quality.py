"""Detection-quality benchmark: train each category under a CPU budget, then score detection variants.

    python -m benchmarks.quality [--data /work/shared/data] [--minutes 30] [--categories ...] [--configs ...]

For every (category, training variant) one bundle is trained with the toolkit defaults plus the
variant's overrides; every detection variant of ``--configs`` is then scored on the whole test
set (the paper path on ``--paper-images`` evenly spaced test images, since it is ~K times slower).
One JSON line per configuration: category, train/detect overrides, image_auroc, pixel_auroc,
aupro, per-type image AUROC, seconds_per_image, training minutes, and speed ratio to the paper path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from anoddpm.config import Config

CATEGORIES = {"magnetic_tile": ("magnetic_tile", "magnetic_tile"), "juice_bottle": ("mvtec_loco", "juice_bottle")}
TRAIN_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {  # overrides of the current defaults (docs/quality.md)
    "default": {},
    "no_head": {"head": {"enabled": False}},
    "no_healing": {"train": {"anomaly_fraction": 0.0}},
    "simplex": {"diffusion": {"noise": "simplex"}},
    "t300": {"diffusion": {"t_max_fraction": 0.3}},
    "texture": {"data": {"augment": "texture"}},
    "flips": {"data": {"augment": "flips"}},
    "crop64": {"data": {"train_crop": 64}},
    "intensity": {"data": {"intensity": "per_image"}},
    "size256_crop128": {"data": {"image_size": 256, "train_crop": 128}},
    "heal_cap34": {"train": {"heal_snr_cap": 34.0}},
}
HEAD_SCORERS = ("head", "fused")  # detection variants that need a bundle with a scoring head
DETECT_VARIANTS: dict[str, dict[str, Any]] = {
    # the paper's sampler at the bundle's depth: one ancestral step per timestep (the speed reference)
    "paper": {"sampler": "ancestral", "steps": None},
    "default": {},
    "residual": {"scorer": "residual"},
    "head": {"scorer": "head"},
    "K5": {"steps": 5},
    "depth100": {"depth": 100},
    "depth250": {"depth": 250},
    "samples4": {"samples": 4},
    "l1": {"residual": "l1"},
    "ssim": {"residual": "ssim"},
    "brightness": {"residual_norm": "brightness"},
    "topk": {"score": "topk"},
    "good_mean": {"map_reference": "good_mean"},
    "no_reference": {"map_reference": "none"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data", help="root holding <dataset>/<category> folders")
    p.add_argument("--minutes", type=float, default=30.0, help="total training budget per category and variant")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    p.add_argument("--train-variants", nargs="+", default=list(TRAIN_VARIANTS), choices=list(TRAIN_VARIANTS))
    p.add_argument("--configs", nargs="+", default=list(DETECT_VARIANTS), choices=list(DETECT_VARIANTS),
                   help="detection variants (the paper path is the speed reference)")
    p.add_argument("--paper-images", type=int, default=40, help="test images scored on the paper path")
    p.add_argument("--out", default="runs/quality", help="where bundles are written")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reuse", action="store_true", help="reuse existing bundles instead of training")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU is shared)")
    return p.parse_args(argv)


def train_variant(args: argparse.Namespace, category: str, variant: str) -> tuple[Path, float]:
    """Train (or reuse) one bundle; returns (bundle path, training minutes)."""
    from anoddpm.training.train import train

    dataset, name = CATEGORIES[category]
    cfg = Config().override("train", max_minutes=args.minutes)
    for section, values in TRAIN_VARIANTS[variant].items():
        cfg = cfg.override(section, **values)
    out = Path(args.out) / category / variant
    if args.reuse and (out / "model.pt").is_file():
        return out / "model.pt", float("nan")
    start = time.monotonic()
    bundle = train(cfg, Path(args.data) / dataset, name, out, resume=False, device=args.device)
    return Path(bundle), (time.monotonic() - start) / 60


def load_test_arrays(cfg: Config, root: Path, category: str) -> dict[str, Any]:
    """Labelled test set: images [N,C,S,S], masks [N,S,S] bool, labels [N], defect types."""
    from anoddpm.data.datasets import load_test_set

    samples = load_test_set(cfg, root, category)
    items = [samples[i] for i in range(len(samples))]
    return {
        "images": np.stack([np.asarray(s.image, dtype=np.float32) for s in items]),
        "masks": np.stack([np.asarray(s.mask, dtype=bool) for s in items]),
        "labels": np.array([int(s.label) for s in items]),
        "types": [str(s.defect_type) for s in items],
    }


def evaluate_variant(bundle: Any, overrides: dict[str, Any], test: dict[str, Any], index: np.ndarray,
                     root: Path, category: str, device: Any, batch_size: int) -> dict[str, Any]:
    """Score test images ``index`` with detection overrides -> metrics dict (+ seconds_per_image).

    With overrides, the map reference is refitted on the bundle's held-back good images (as
    `anoddpm evaluate` does), since the bundle's reference belongs to its own detection settings."""
    from anoddpm.detection.detector import Detector
    from anoddpm.detection.calibration import score_validation
    from anoddpm.detection.tiling import inspection_detector
    from eval.metrics import compute_metrics, per_type_auroc, per_type_pixel_auroc

    overrides = dict(overrides)
    if "steps" in overrides and overrides["steps"] is None:
        overrides["steps"] = overrides.get("depth", bundle.cfg.detect.depth)
    view = inspection_detector(Detector.from_bundle(bundle, device, **overrides), batch_size)
    if overrides:
        score_validation(bundle, view, root, category, device, batch_size)
    scored = view.score_set(test["images"][index], device)
    labels, masks = test["labels"][index], test["masks"][index]
    types = [test["types"][i] for i in index]
    metrics = compute_metrics(scored.scores, labels, scored.maps, masks)
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"],
            "per_type_image_auroc": per_type_auroc(scored.scores, labels, types),
            "per_type_pixel_auroc": per_type_pixel_auroc(scored.maps, masks, types),
            "seconds_per_image": scored.seconds_per_image}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints one JSON line per configuration."""
    from anoddpm.bundle import load_bundle
    from anoddpm.platform.device import resolve_device

    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for category in args.categories:
        dataset, name = CATEGORIES[category]
        for variant in args.train_variants:
            bundle_path, minutes = train_variant(args, category, variant)
            bundle = load_bundle(bundle_path, map_location=device)
            test = load_test_arrays(bundle.cfg, Path(args.data) / dataset, name)
            n = len(test["labels"])
            paper_index = np.unique(np.linspace(0, n - 1, min(args.paper_images, n)).round().astype(int))
            paper_seconds = None
            for config in args.configs:
                if DETECT_VARIANTS[config].get("scorer") in HEAD_SCORERS and bundle.head_state_dict is None:
                    print(f"skipping detection variant {config!r}: {bundle_path} has no scoring head", file=sys.stderr)
                    continue
                index = paper_index if config == "paper" else np.arange(n)
                result = evaluate_variant(bundle, DETECT_VARIANTS[config], test, index, Path(args.data) / dataset,
                                          name, device, args.batch_size)
                if config == "paper":
                    paper_seconds = result["seconds_per_image"]
                speedup = None if paper_seconds is None else paper_seconds / result["seconds_per_image"]
                print(json.dumps({"category": category, "train": variant, "train_overrides": TRAIN_VARIANTS[variant],
                                  "detect": config, "detect_overrides": DETECT_VARIANTS[config], "n_images": len(index),
                                  **result, "training_minutes": minutes, "speedup_vs_paper": speedup}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
