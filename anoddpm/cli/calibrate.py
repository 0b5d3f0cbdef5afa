"""`anoddpm calibrate`: fit every state and the threshold on held-back good images and store them in the bundle;
the detection flags given become the bundle's settings (``anoddpm.detection.calibration``)."""
from __future__ import annotations

import argparse

from anoddpm.bundle import load_bundle
from anoddpm.cli.parser import detect_overrides
from anoddpm.detection.calibration import calibrate_threshold, store_calibration, training_root
from anoddpm.detection.detector import Detector
from anoddpm.detection.tiling import inspection_detector
from anoddpm.platform.device import resolve_device


def calibrate_command(args: argparse.Namespace) -> int:
    """`anoddpm calibrate`: compute the threshold and write it into --model; returns the exit code."""
    device = resolve_device(args.device)
    bundle = load_bundle(args.model, map_location=device)
    overrides = {k: v for k, v in detect_overrides(args).items() if v is not None}
    view = inspection_detector(Detector.from_bundle(bundle, device, **overrides).eval(), args.batch_size)
    root, category = training_root(bundle, args.data, args.category)
    quantile = args.quantile if args.quantile is not None else view.cfg.detect.threshold_quantile
    threshold = calibrate_threshold(bundle, view, device, args.batch_size, root, category, quantile,
                                    getattr(args, "method", "quantile"))
    store_calibration(args.model, threshold, view.detector)
    pixel = threshold["pixel"]
    print(f"calibrated {args.model}: image threshold {threshold['image']:.6g} ({threshold['method']}, "
          f"{threshold['n_good']} good images), pixel threshold "
          f"{'n/a' if pixel is None else f'{pixel:.6g}'}")
    return 0


