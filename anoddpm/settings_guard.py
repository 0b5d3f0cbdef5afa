"""The one rule: a score is only compared with a threshold (and map reference) calibrated for the
detection settings that produced it.

Every command that turns scores into verdicts (`score`, `evaluate`, `export`) gets its detector and
threshold from ``calibrated_detector``: with the bundle's own settings it uses the bundle's
calibration; with other settings (flags such as ``--depth``, ``export --steps``) it recalibrates on
the bundle's held-back good images and says so, or refuses naming the flags when those images are
not at hand. The bundle file is never changed here (``anoddpm calibrate`` stores a calibration).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from anoddpm.config import LEGACY_DETECT, DetectConfig

log = logging.getLogger(__name__)
IGNORED = ("threshold_quantile",)  # how the threshold was picked, not how scores are made
_FLAGGED = ("depth", "steps", "samples", "sampler", "residual", "residual_norm", "score", "scorer", "map_reference",
            "reference_neighbours", "fusion")  # DetectConfig fields with a flag of their name; noise is --detect-noise


def flag_of(field: str) -> str:
    """How a user sets a DetectConfig field: its flag (``noise`` -> ``--detect-noise``), else ``detect.<field>``."""
    if field == "noise":
        return "--detect-noise"
    return "--" + field.replace("_", "-") if field in _FLAGGED else f"detect.{field}"


def _for_missing_fields() -> dict[str, Any]:
    """What a threshold without a field (older than it) was made with: the default, or its LEGACY_DETECT value."""
    return {**asdict(DetectConfig()), **LEGACY_DETECT}


def detect_differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """Fields of `current` (a DetectConfig dict) whose value differs from the calibrated `stored` one;
    a field missing from `stored` (a bundle older than that field) counts as what such bundles did."""
    defaults = _for_missing_fields()
    stored = stored or {}
    return [k for k, v in current.items() if k not in IGNORED and stored.get(k, defaults.get(k)) != v]


def same_detect_settings(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
    """True when a threshold calibrated with `stored` detection settings may judge scores made with `current`."""
    return stored is not None and not detect_differences(stored, current)


def describe_differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """'--depth 50 -> 100, --steps 1 -> 5' for the differing fields ('no recorded settings' without any)."""
    if stored is None:
        return "no recorded detection settings"
    defaults = _for_missing_fields()
    return ", ".join(f"{flag_of(k)} {stored.get(k, defaults.get(k))} -> {current[k]}"
                     for k in detect_differences(stored, current))


LEGACY_AUTO = ("residual", "head")  # what scorer 'auto' combined in thresholds that predate feature components


def calibrated_components(threshold: Mapping[str, Any], has_head: bool) -> tuple[str, ...]:
    """The component maps a stored threshold was calibrated with (older thresholds: from their detect.scorer)."""
    from anoddpm.config import scorer_components

    if threshold.get("components") is not None:
        return tuple(threshold["components"])
    scorer = (threshold.get("detect") or {}).get("scorer", "auto")
    if scorer == "auto":
        return tuple(c for c in LEGACY_AUTO if has_head or c != "head")
    return scorer_components(scorer, has_head)


def calibrated_for(threshold: Mapping[str, Any] | None, detector: Any) -> bool:
    """True when `threshold` (a bundle's, or None) was calibrated with the detector's settings and components, so
    the same scorer name ('auto') meaning other component maps in another version never passes."""
    return (threshold is not None and same_detect_settings(threshold.get("detect"), asdict(detector.cfg.detect))
            and calibrated_components(threshold, detector.head is not None) == tuple(detector.components))


def calibrated_detector(bundle: Any, device: torch.device, batch_size: int, overrides: Mapping[str, Any],
                        verb: str, *, data: str | Path | None = None, category: str | None = None,
                        calibrate_missing: bool = False) -> tuple[Any, dict[str, Any] | None, str]:
    """(Detector (a TiledDetector when the config tiles) with `overrides` of the bundle's detect settings, the threshold dict that belongs to those
    settings, where it came from: "bundle", "validation split (on the fly)" or "none").

    The bundle's threshold and references serve only its own settings; otherwise the held-back good images
    of the training split (under `data`, default the bundle's recorded training root) are scored now, which
    also fits the references the settings need. ValueError naming the flags when those images cannot be read.
    A bundle without a threshold gives (detector, None, "none") unless `calibrate_missing`.
    """
    from anoddpm.detector import Detector
    from anoddpm.evaluate import calibrate_threshold, training_root
    from anoddpm.tiled import inspection_detector

    detector = Detector.from_bundle(bundle, device, **{k: v for k, v in overrides.items() if v is not None}).eval()
    detector = inspection_detector(detector, batch_size)
    current = asdict(detector.cfg.detect)
    stored = None if bundle.threshold is None else bundle.threshold.get("detect")
    if bundle.threshold is None and not calibrate_missing:
        return detector, None, "none"
    if calibrated_for(bundle.threshold, detector):
        return detector, dict(bundle.threshold), "bundle"
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
    threshold = calibrate_threshold(bundle, detector, device, batch_size, root, category,
                                    current["threshold_quantile"], "quantile")
    return detector, threshold, "validation split (on the fly)"
