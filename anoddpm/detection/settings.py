"""The one rule, as data: a score is only compared with a threshold (and fitted states) calibrated for the detection
settings and components that produced it. ``calibrated_for`` decides; ``detect_differences`` and
``describe_differences`` say what differs, in the flags a user types. ``anoddpm.detection.guard`` acts on it."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from anoddpm.config import LEGACY_DETECT, DetectConfig, scorer_components

IGNORED = ("threshold_quantile",)  # how the threshold was picked, not how scores are made
_FLAGGED = ("depth", "steps", "guidance", "samples", "sampler", "residual", "residual_norm", "score", "scorer", "map_reference",
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
