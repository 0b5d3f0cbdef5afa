"""The settings guard: every command that turns scores into verdicts (`score`, `evaluate`, `export`) gets its
detector and threshold from ``calibrated_detector``.

With the bundle's own settings it uses the bundle's calibration; with other settings (flags such as ``--depth``,
``export --steps``) it recalibrates on the bundle's held-back good images and says so, or refuses naming the flags
when those images are not at hand. The bundle file is never changed here (``anoddpm calibrate`` stores a
calibration).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from anoddpm.detection.calibration import calibrate_threshold, training_root
from anoddpm.detection.detector import Detector
from anoddpm.detection.settings import (calibrated_components, calibrated_for, describe_differences,
                                        detect_differences, flag_of)
from anoddpm.detection.tiling import WholeImages, inspection_detector

log = logging.getLogger(__name__)


def calibrated_detector(bundle: Any, device: torch.device, batch_size: int, overrides: Mapping[str, Any],
                        verb: str, *, data: str | Path | None = None, category: str | None = None,
                        calibrate_missing: bool = False) -> tuple[WholeImages, dict[str, Any] | None, str]:
    """(the inspection view (``tiling.inspection_detector``) of the bundle's Detector with `overrides` of its detect
    settings, the threshold dict that belongs to those settings, where it came from: "bundle", "validation split
    (on the fly)" or "none").

    The bundle's threshold and references serve only its own settings; otherwise the held-back good images
    of the training split (under `data`, default the bundle's recorded training root) are scored now, which
    also fits the references the settings need. ValueError naming the flags when those images cannot be read.
    A bundle without a threshold gives (detector, None, "none") unless `calibrate_missing`.
    """
    detector = Detector.from_bundle(bundle, device, **{k: v for k, v in overrides.items() if v is not None}).eval()
    view = inspection_detector(detector, batch_size)
    current = asdict(detector.cfg.detect)
    stored = None if bundle.threshold is None else bundle.threshold.get("detect")
    if bundle.threshold is None and not calibrate_missing:
        return view, None, "none"
    if calibrated_for(bundle.threshold, detector):
        return view, dict(bundle.threshold), "bundle"
    differences = describe_differences(stored, current) if stored is None or detect_differences(stored, current) else (
        f"components {', '.join(calibrated_components(bundle.threshold, detector.head is not None))} -> "
        f"{', '.join(detector.components)}")
    why = ("has no threshold" if bundle.threshold is None else
           f"was calibrated for other detection settings ({differences})")
    try:
        root, category = training_root(bundle, data, category)
        if not root.exists():
            raise FileNotFoundError(f"its training data {root} is not here")
    except (ValueError, FileNotFoundError) as err:
        flags = " ".join(flag_of(k) for k in detect_differences(stored, current)) or "the detection flags"
        raise ValueError(f"{bundle.path} {why} and cannot be recalibrated: {err}; run `anoddpm calibrate --model "
                         f"{bundle.path} --data ROOT` with the same flags, or drop {flags}") from err
    log.warning("%s: %s %s; calibrating on its held-back good images under %s now (the bundle is not changed; "
                "`anoddpm calibrate` with the same flags stores it)", verb, bundle.path, why, root)
    threshold = calibrate_threshold(bundle, view, device, batch_size, root, category, current["threshold_quantile"],
                                    "quantile")
    return view, threshold, "validation split (on the fly)"
