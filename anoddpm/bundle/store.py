"""The model bundle `model.pt`: everything needed to use a trained model, nothing executable.

The file is a `torch.save`d dict of tensors and builtins only (format_version, versions, the
resolved config, EMA weights, preprocessing, noise parameters, data fingerprint, threshold, and
optionally ``head_state_dict``, the learned scoring head's weights, ``adapted_backbone``, the backbone copy adapted to
the model's reconstructions (``train.adapt_steps``), and the map reference fitted with
the threshold: ``map_reference`` [1, K, S, S] or ``reference_bank``, thumbnails and pooled maps of the
training images), so
it loads with `torch.load(weights_only=True)`: a crafted pickle cannot run code on load.

Every calibration written here is sealed: its threshold carries ``calibration_sha256``
(``checks.calibration_fingerprint`` of the weights, fitted states and threshold it is stored with) and the file
``calibration_seal``; ``load_bundle`` refuses a calibration that does not match (copied from another bundle or
altered), a threshold or weight that is not a finite number, and fitted states of the wrong type or shape.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from anoddpm.version import BUNDLE_FORMAT_VERSION, __version__
from anoddpm.platform.atomic import atomic_torch_save
from anoddpm.bundle.checks import (FITTED, LATER_FITTED, SEAL_KEY, SEAL_VERSION, calibration_fingerprint,
                                   check_bundle_file,
                                   check_calibration, check_weights, fitted_problem, threshold_problem)
from anoddpm.config import LEGACY_DETECT, Config

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """A loaded model.pt: config, EMA weights, data fingerprint, threshold (None = uncalibrated)."""

    cfg: Config
    state_dict: dict[str, torch.Tensor]
    fingerprint: dict[str, Any]
    threshold: dict[str, Any] | None
    versions: dict[str, Any]
    path: Path
    head_state_dict: dict[str, torch.Tensor] | None = None  # learned scoring head, if one was trained
    adapted_backbone: dict[str, torch.Tensor] | None = None  # backbone weights adapted to the reconstructions, if any
    map_reference: torch.Tensor | None = None  # [1, K, S, S] reference map per component map (K = 2 for fused), if fitted
    # nearest_good bank, if fitted: "features" [N, F] thumbnails, "maps" [N, K, s, s] pooled component maps
    reference_bank: dict[str, torch.Tensor] | None = None
    feature_memory: torch.Tensor | None = None  # [M, D] good patch features of the feature_memory component, if fitted
    component_scale: torch.Tensor | None = None  # [K] per-component unit of detect.fusion max, if fitted
    backbone: dict[str, str] | None = None  # {"name", "sha256"} of the backbone weights the calibration used, if any
    # model.condition 'retrieval': "embeddings" [N, D] and "images" [N, C, S, S] uint8 of the good images it retrieves
    retrieval: dict[str, torch.Tensor] | None = None
    calibration_problem: str | None = None  # why the stored calibration was dropped (load_bundle drop_bad_calibration)


def _plain(obj: Any) -> Any:
    """Recursively turn numpy scalars, paths and tuples into builtins that weights_only accepts."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / 0-d torch scalars
        return obj.item()
    raise ValueError(f"bundle field of type {type(obj).__name__} is not a builtin; cannot store {obj!r}")


def _cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def bundle_payload(cfg: Config, state_dict: Mapping[str, torch.Tensor], fingerprint: Mapping[str, Any],
                   threshold: Mapping[str, Any] | None,
                   head_state_dict: Mapping[str, torch.Tensor] | None = None,
                   adapted_backbone: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The exact dict written to model.pt (tensors moved to CPU); "head_state_dict", "adapted_backbone" only when
    given."""
    d = cfg.diffusion
    payload = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "anoddpm_version": __version__,
        "torch_version": str(torch.__version__),
        "config": cfg.to_dict(),
        "state_dict": _cpu(state_dict),
        "preprocessing": cfg.data.preprocessing(),
        "noise": {"kind": d.noise, "octaves": d.octaves, "persistence": d.persistence,
                  "frequency": d.frequency, "standardise": d.standardise},
        "fingerprint": _plain(dict(fingerprint)),
        "threshold": None if threshold is None else _plain(dict(threshold)),
    }
    if head_state_dict is not None:
        payload["head_state_dict"] = _cpu(head_state_dict)
    if adapted_backbone is not None:
        payload["adapted_backbone"] = _cpu(adapted_backbone)
    return _sealed(payload)


def _sealed(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with its threshold (if any) carrying the calibration fingerprint of everything stored beside it."""
    raw["calibration_seal"] = SEAL_VERSION
    if raw.get("threshold") is not None:
        raw["threshold"] = {k: v for k, v in raw["threshold"].items() if k != SEAL_KEY}
        raw["threshold"][SEAL_KEY] = calibration_fingerprint(raw)
    return raw


def save_bundle(path: str | Path, *, cfg: Config, state_dict: Mapping[str, torch.Tensor],
                fingerprint: Mapping[str, Any], threshold: Mapping[str, Any] | None = None,
                head_state_dict: Mapping[str, torch.Tensor] | None = None,
                adapted_backbone: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write model.pt atomically; `state_dict` is the EMA weights of `build_unet(cfg)`, `head_state_dict`
    those of `anoddpm.model.head.build_head(cfg)`, `adapted_backbone` those of an adapted
    `anoddpm.detection.backbone.FeatureExtractor(cfg.backbone)` (both optional)."""
    return atomic_torch_save(bundle_payload(cfg, state_dict, fingerprint, threshold, head_state_dict,
                                            adapted_backbone), path)


def _read_raw(path: Path, map_location: Any) -> dict[str, Any]:
    check_bundle_file(path)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise ValueError(f"{path} was refused: it holds Python objects other than tensors and builtins "
                             "(not an anoddpm bundle, or a crafted file); nothing in it was executed") from err
        raise ValueError(f"{path} is not a readable anoddpm bundle (truncated or corrupted?): {err}") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path} is not a readable anoddpm bundle (truncated or corrupted?): {err}") from err
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise ValueError(f"{path} is not an anoddpm bundle: no format_version field")
    version = raw["format_version"]
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has an invalid bundle format_version {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise ValueError(f"{path} has bundle format_version {version}, newer than this anoddpm "
                         f"{__version__} reads (up to {BUNDLE_FORMAT_VERSION}); upgrade anoddpm")
    missing = [k for k in ("config", "state_dict", "fingerprint", "threshold") if k not in raw]
    if missing:
        raise ValueError(f"{path} is not a complete anoddpm bundle: missing {', '.join(missing)}")
    return raw


def load_bundle(path: str | Path, map_location: Any = "cpu", *, drop_bad_calibration: bool = False) -> Bundle:
    """Read model.pt safely (weights_only); ValueError naming the file if it is not a usable bundle: weights that
    are not finite floating-point tensors, an invalid config, or a calibration (threshold, fitted states) that is
    malformed, not finite or not this bundle's (``checks.check_calibration``). With `drop_bad_calibration` (for
    `anoddpm calibrate`, which replaces it, and `info`) such a calibration is dropped instead, with a warning, and
    ``Bundle.calibration_problem`` says why."""
    path = Path(path)
    raw = _read_raw(path, map_location)
    check_weights(path, raw)
    if not isinstance(raw["config"], Mapping):
        raise ValueError(f"{path} holds an invalid config: it must be a mapping of sections, got "
                         f"{type(raw['config']).__name__}; this file was not written by anoddpm train")
    config = dict(raw["config"])
    if isinstance(config.get("detect", {}), Mapping):  # fields newer than the bundle: its behaviour
        config["detect"] = {**LEGACY_DETECT, **config.get("detect", {})}
    try:
        cfg = Config.from_dict(config).validate()
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} holds an invalid config: {err}") from err
    if not isinstance(raw["fingerprint"], Mapping):
        raise ValueError(f"{path}: its data fingerprint must be a mapping, got {type(raw['fingerprint']).__name__}; "
                         "this file was not written by anoddpm train")
    problem = None
    try:
        check_calibration(path, raw, cfg)
    except ValueError as err:
        if not drop_bad_calibration:
            raise
        problem = str(err)
        log.warning("%s; its calibration is not used", problem)
        raw = {**raw, "threshold": None, **dict.fromkeys(FITTED + LATER_FITTED)}
    versions = {"format_version": raw["format_version"], "anoddpm": raw.get("anoddpm_version"),
                "torch": raw.get("torch_version")}
    return Bundle(cfg=cfg, state_dict=raw["state_dict"], fingerprint=raw["fingerprint"],
                  threshold=raw["threshold"], versions=versions, path=path, head_state_dict=raw.get("head_state_dict"),
                  adapted_backbone=raw.get("adapted_backbone"),
                  map_reference=raw.get("map_reference"), reference_bank=raw.get("reference_bank"),
                  feature_memory=raw.get("feature_memory"), backbone=raw.get("backbone"),
                  component_scale=raw.get("component_scale"), retrieval=raw.get("retrieval"),
                  calibration_problem=problem)


def update_threshold(path: str | Path, threshold: Mapping[str, Any] | None,
                     map_reference: torch.Tensor | None = None,
                     reference_bank: Mapping[str, torch.Tensor] | None = None,
                     feature_memory: torch.Tensor | None = None, backbone: Mapping[str, str] | None = None,
                     component_scale: torch.Tensor | None = None,
                     retrieval: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Replace the calibration stored in model.pt: the threshold and the references fitted with it, the
    reference maps [1, K, S, S], the nearest_good bank {"features", "maps"}, the feature_memory bank [M, D], the
    retrieval database {"embeddings" [N, D], "images" [N, C, S, S] uint8} and the backbone identity
    {"name", "sha256"} they were computed with (None removes each); atomic rewrite, everything else kept.

    A threshold carrying the detection settings it was calibrated with ("detect") makes them the
    bundle's config.detect, so every later command (score, evaluate, export) uses what was calibrated. The stored
    threshold is sealed (``calibration_fingerprint``); a threshold or fitted state that is not a finite number is
    refused (ValueError) and nothing is written.
    """
    path = Path(path)
    raw = _read_raw(path, "cpu")
    raw["threshold"] = None if threshold is None else _plain(dict(threshold))
    if threshold is not None and threshold.get("detect"):
        config = {**raw["config"], "detect": {**raw["config"].get("detect", {}), **_plain(dict(threshold["detect"]))}}
        try:
            Config.from_dict(config).validate()
        except (ValueError, TypeError) as err:
            raise ValueError(f"threshold for {path} carries invalid detection settings: {err}") from err
        raw["config"] = config
    raw.pop("map_reference", None)
    if map_reference is not None:
        raw["map_reference"] = map_reference.detach().to("cpu", torch.float32, copy=True)
    raw.pop("reference_bank", None)
    if reference_bank is not None:
        raw["reference_bank"] = {k: reference_bank[k].detach().to("cpu", torch.float32, copy=True)
                                 for k in ("features", "maps")}
    raw.pop("feature_memory", None)
    if feature_memory is not None:
        raw["feature_memory"] = feature_memory.detach().to("cpu", torch.float32, copy=True)
    raw.pop("component_scale", None)
    if component_scale is not None:
        raw["component_scale"] = component_scale.detach().to("cpu", torch.float32, copy=True)
    raw.pop("retrieval", None)
    if retrieval is not None:
        raw["retrieval"] = {"embeddings": retrieval["embeddings"].detach().to("cpu", torch.float32, copy=True),
                            "images": retrieval["images"].detach().to("cpu", torch.uint8, copy=True)}
    raw.pop("backbone", None)
    if backbone is not None:
        raw["backbone"] = _plain(dict(backbone))
    problem = threshold_problem(raw["threshold"]) or fitted_problem(raw, Config.from_dict(raw["config"]))
    if problem is not None:
        raise ValueError(f"{path}: the calibration was not written: its {problem}; the model's scores are not "
                         "finite numbers (did the training diverge?) or the calibration is malformed")
    return atomic_torch_save(_sealed(raw), path)
