"""`anoddpm calibrate`: fit every state and the threshold on held-back good images and store them in the bundle;
the detection flags given become the bundle's settings (``anoddpm.detection.calibration``). Only a new --quantile
(no detection flag, the same data) rescores the last calibration's cached good scores instead
(``anoddpm.detection.requantile``): no model run. ``--shots K`` fits everything on K good images of --data, with the
threshold leave-one-out (``anoddpm.detection.fewshot``): a product inspected from a handful of images and a model
trained on others, whose retrieval database (``model.condition`` 'retrieval') becomes those images."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from anoddpm.bundle import load_bundle
from anoddpm.cli.parser import detect_overrides
from anoddpm.data.datasets import load_training_data
from anoddpm.detection.calibration import calibrate_threshold, data_record, store_calibration, training_root
from anoddpm.detection.detector import Detector
from anoddpm.detection.fewshot import calibrate_shots
from anoddpm.detection.requantile import cache_problem, requantile
from anoddpm.detection.settings import calibrated_for
from anoddpm.detection.tiling import inspection_detector
from anoddpm.platform.device import resolve_device

log = logging.getLogger(__name__)


def calibrate_command(args: argparse.Namespace) -> int:
    """`anoddpm calibrate`: compute the threshold and write it into --model; returns the exit code."""
    if args.quantile is not None and not 0.0 < args.quantile <= 1.0:
        raise ValueError(f"--quantile must be in (0, 1] (e.g. 0.99: about 1 % of good parts flagged), got {args.quantile}")
    device = resolve_device(args.device)
    bundle = load_bundle(args.model, map_location=device, drop_bad_calibration=True)  # replaced here: not refused
    overrides = {k: v for k, v in detect_overrides(args).items() if v is not None}
    if not getattr(args, "out", None):
        print(_calibrate(args, bundle, overrides, device, Path(args.model)))
        return 0
    # --out: calibrate a copy beside it and put it in place only when done, so a failed calibration never leaves
    # the base's threshold (fitted on other images) at --out
    out = Path(args.out)
    work = out.with_name(f".{out.name}.calibrating.tmp")
    shutil.copyfile(args.model, work)
    try:
        message = _calibrate(args, bundle, overrides, device, work)
        os.replace(work, out)
    finally:
        work.unlink(missing_ok=True)
    print(message.replace(str(work), str(out)))
    return 0


def _calibrate(args: argparse.Namespace, bundle: Any, overrides: dict, device: Any, path: Path) -> str:
    """Calibrate `bundle` as the flags say and store the result in the bundle file at `path` -> the summary line."""
    if getattr(args, "shots", None) is not None:
        threshold = _calibrate_on_shots(args, bundle, overrides, device, path)
        return (f"calibrated {path} on {args.shots} shot(s) of {args.data}, leave-one-out: image threshold "
                f"{threshold['image']:.6g}")
    view = inspection_detector(Detector.from_bundle(bundle, device, **overrides).eval(), args.batch_size)
    root, category = training_root(bundle, args.data, args.category)
    quantile = args.quantile if args.quantile is not None else view.cfg.detect.threshold_quantile
    method = getattr(args, "method", "quantile")
    threshold = _from_cached_scores(args, bundle, view, overrides, root, category, method)
    if threshold is None:
        threshold = calibrate_threshold(bundle, view, device, args.batch_size, root, category, quantile, method)
    store_calibration(path, threshold, view.detector)
    pixel = threshold["pixel"]
    return (f"calibrated {path}: image threshold {threshold['image']:.6g} ({threshold['method']}, "
            f"{threshold['n_good']} good images), pixel threshold {'n/a' if pixel is None else f'{pixel:.6g}'}")


def _calibrate_on_shots(args: argparse.Namespace, bundle: Any, overrides: dict, device: Any,
                        path: Path) -> dict[str, Any]:
    """`calibrate --shots K`: every state fitted on K good images of --data drawn with --shots-seed, the threshold
    leave-one-out; the shots are recorded in threshold["few_shot"] -> the threshold dict."""
    if args.shots < 1:
        raise ValueError(f"--shots {args.shots}: a few-shot calibration needs at least one good image (K >= 1)")
    if args.data is None:
        raise ValueError("--shots K needs --data ROOT [--category NAME]: the folder the K good images are drawn from")
    if args.method != "quantile" or args.quantile is not None:
        raise ValueError("--shots K takes the threshold at the bundle's detect.threshold_quantile from leave-one-out "
                         "scores; leave out --method and --quantile")
    cfg = bundle.cfg.override("data", shots=args.shots, shots_seed=args.shots_seed).validate()
    shots_ds, _, fingerprint = load_training_data(cfg, args.data, args.category, cfg.train.seed)
    few_shot = {"shots": args.shots, "shots_seed": args.shots_seed, "shot_files": fingerprint.get("shot_files")}
    return calibrate_shots(path, shots_ds.arrays, device, overrides=overrides, few_shot=few_shot,
                           data=data_record(args.data, args.category, fingerprint.get("kind")))


def _from_cached_scores(args: argparse.Namespace, bundle: Any, view: Any, overrides: dict, root: Path,
                        category: str | None, method: str) -> dict[str, Any] | None:
    """The bundle's calibration at --quantile from its cached good scores when only the quantile changes, else None
    (a full calibration: detection flags, other data, --method f1, no --quantile, no usable cache)."""
    if args.quantile is None or overrides or method != "quantile" or bundle.threshold is None:
        return None
    if not calibrated_for(bundle.threshold, view.detector):
        return None
    problem = cache_problem(bundle.threshold, root, category)
    if problem is not None:
        log.info("calibrate: refitting every state: %s", problem)
        return None
    log.info("calibrate: only the quantile changes: %d cached held-back good scores give the new threshold, every "
             "fitted state is kept (no model run)", bundle.threshold["good_cache"].get("n", 0))
    return requantile(bundle.threshold, args.quantile)
