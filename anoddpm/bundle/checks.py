"""Checks a model.pt passes before anything in it is used: the right kind of file, intact bytes, weights that are
finite floating-point tensors, a calibration whose every field has its type and finite values, and a calibration
that belongs to the weights and fitted states it is stored with (``calibration_fingerprint``).
ValueError/FileNotFoundError naming the file and what to do."""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from anoddpm.config import Config

SEAL_KEY = "calibration_sha256"  # in the threshold dict: calibration_fingerprint of the bundle it was stored in
SEAL_VERSION = 1  # the bundle key "calibration_seal": every threshold this file holds carries SEAL_KEY
SEALED_CONFIG = ("data", "model", "diffusion", "head", "backbone")  # config sections a score depends on (detect:
# the threshold's own "detect"; train: how the weights were made, not how a score is)
FITTED = ("map_reference", "reference_bank", "feature_memory", "component_scale", "backbone")  # bundle keys
# fitted states added later: sealed only when present, so older calibrations keep their fingerprint
LATER_FITTED = ("retrieval",)


def check_bundle_file(path: Path) -> None:
    """Refuse a folder, a missing file, an ONNX export or any non-zip file, and a zip whose CRC-32 checksums
    do not match its bytes (a bundle corrupted on disk or in transfer: torch.load does not check them)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the bundle file in it, e.g. {path / 'model.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"model bundle not found: {path}")
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".onnx":
            raise ValueError(f"{path} is an exported ONNX model, not an anoddpm bundle; give the model.pt it was "
                             "exported from (ONNX files are for `anoddpm inspect` and `anoddpm info`)")
        raise ValueError(f"{path} is not a readable anoddpm bundle (truncated or corrupted?): it is not the zip file "
                         "`anoddpm train` writes; copy it again from its run folder")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as err:
        raise ValueError(f"{path} is corrupted (its zip structure cannot be read: {err}); copy it again") from err
    if damaged is not None:
        raise ValueError(f"{path} is corrupted: the checksum of {damaged} does not match its bytes; copy the bundle "
                         "again from its run folder (nothing in it was used)")


def check_weights(path: Path, raw: Mapping[str, Any]) -> None:
    """Refuse state dicts that are not a mapping of names to tensors (a hand-edited or foreign file), weights that
    are not floating point (an integer copy truncated them) and weights that are NaN or infinite (every score
    would be NaN: a part passed as good)."""
    for key in ("state_dict", "head_state_dict", "adapted_backbone"):
        weights = raw.get(key)
        if weights is None and key != "state_dict":
            continue
        if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in weights.items()):
            raise ValueError(f"{path}: its {key} is not a mapping of weight names to tensors "
                             f"(got {type(weights).__name__}); this file was not written by anoddpm train")
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                raise ValueError(f"{path}: its {key} weight {name} is stored as {tensor.dtype}, not floating point "
                                 "(its values were truncated); the file was altered: copy it again from its run folder")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: its {key} weight {name} holds NaN or infinite values, so every score would "
                                 "be NaN; the training diverged or the file was altered: retrain or copy it again")


def _recalibrate(path: Path) -> str:
    return f"recalibrate: anoddpm calibrate --model {path} [--data ROOT]"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def threshold_problem(threshold: Any) -> str | None:
    """What is wrong with a bundle's threshold ("threshold.image=nan is not a finite number ..."), None when it is
    what a calibration writes: null, or a mapping whose image, pixel and quantile are finite numbers (or null),
    detect / good_cache / data mappings, components a list of names. A NaN threshold labels every part OK."""
    if threshold is None:
        return None
    if not isinstance(threshold, Mapping):
        return f"threshold must be a mapping of calibration fields, got {type(threshold).__name__}"
    for key in ("image", "pixel", "quantile"):
        value = threshold.get(key)
        if value is not None and not _number(value):
            return f"threshold.{key}={value!r} is not a finite number (a NaN or infinite threshold passes every part)"
    for key in ("detect", "good_cache", "data"):
        value = threshold.get(key)
        if value is not None and not isinstance(value, Mapping):
            return f"threshold.{key} must be a mapping, got {type(value).__name__}"
    components = threshold.get("components")
    if components is not None and not (isinstance(components, list) and all(isinstance(c, str) for c in components)):
        return f"threshold.components={components!r} must be a list of component names"
    if not isinstance(threshold.get(SEAL_KEY, ""), str):
        return f"threshold.{SEAL_KEY} must be text"
    return None


def _tensor_problem(value: Any, dims: int) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"must be a tensor, got {type(value).__name__}"
    if value.dim() != dims or not value.is_floating_point():
        return f"must be a {dims}-d floating-point tensor, got {value.dim()}-d {value.dtype}"
    if not bool(torch.isfinite(value).all()):
        return "holds NaN or infinite values"
    return None


def fitted_problem(raw: Mapping[str, Any], cfg: Config) -> str | None:
    """What is wrong with a fitted state of a bundle's raw dict ("feature_memory has rows of width 40, ..."), None
    when each (FITTED) is absent or what a calibration writes: map_reference [1, K, S, S], reference_bank
    {"features" [N, F], "maps" [N, K, s, s]}, feature_memory [M, D] with D the backbone's feature width and its
    backbone identity, component_scale [K] > 0, backbone {"name", "sha256"}; every value finite."""
    problems: dict[str, str | None] = dict.fromkeys(FITTED)
    if raw.get("map_reference") is not None:
        problems["map_reference"] = _tensor_problem(raw["map_reference"], 4)
    bank = raw.get("reference_bank")
    if bank is not None:
        if not isinstance(bank, Mapping) or set(bank) != {"features", "maps"}:
            problems["reference_bank"] = f"must be a mapping of features and maps, got {type(bank).__name__}"
        else:
            problems["reference_bank"] = (_tensor_problem(bank["features"], 2) or _tensor_problem(bank["maps"], 4)
                                          or (None if len(bank["features"]) == len(bank["maps"])
                                              else "has features and maps of different lengths"))
    memory = raw.get("feature_memory")
    if memory is not None:
        width = cfg.backbone.feature_channels
        problems["feature_memory"] = _tensor_problem(memory, 2) or (
            None if memory.shape[1] == width else
            f"has rows of width {memory.shape[1]}, not the {width} of backbone.layers {list(cfg.backbone.layers)}")
    scale = raw.get("component_scale")
    if scale is not None:
        problems["component_scale"] = _tensor_problem(scale, 1) or (
            None if bool((scale > 0).all()) else "holds values that are not positive")
    problems["retrieval"] = _retrieval_problem(raw.get("retrieval"), cfg)
    identity = raw.get("backbone")
    if identity is not None and not (isinstance(identity, Mapping) and all(
            isinstance(identity.get(k), str) for k in ("name", "sha256"))):
        problems["backbone"] = "must be {name, sha256} of the backbone weights"
    elif identity is None and (memory is not None or raw.get("retrieval") is not None):
        problems["backbone"] = "identity is missing: nothing says which backbone weights made the fitted states"
    return next((f"{key} {problem}" for key, problem in problems.items() if problem is not None), None)


def _retrieval_problem(database: Any, cfg: Config) -> str | None:
    """What is wrong with a stored retrieval database: {"embeddings" [N, D] float, "images" [N, C, S, S] uint8} with
    D the backbone's feature width, C and S the model input's, N > model.retrieval_neighbours; None when right or
    absent."""
    if database is None:
        return None
    if not isinstance(database, Mapping) or set(database) != {"embeddings", "images"}:
        return f"must be a mapping of embeddings and images, got {type(database).__name__}"
    embeddings, images = database["embeddings"], database["images"]
    problem = _tensor_problem(embeddings, 2)
    if problem is not None:
        return f"embeddings {problem}"
    d = cfg.data
    expected = [len(embeddings), d.channels, d.input_side, d.input_side]
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or list(images.shape) != expected:
        return f"images must be a uint8 tensor of shape {expected}"
    if embeddings.shape[1] != cfg.backbone.feature_channels:
        return f"embeddings have width {embeddings.shape[1]}, not the {cfg.backbone.feature_channels} of the backbone"
    if len(embeddings) <= cfg.model.retrieval_neighbours:
        return f"holds {len(embeddings)} images, not more than model.retrieval_neighbours"
    return None


def _feed(digest: Any, value: Any) -> None:
    """Add `value` (tensors, mappings, lists, builtins) to `digest` in one canonical byte form."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{list(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, allow_nan=True, default=str).encode())
    digest.update(b";")


def calibration_fingerprint(raw: Mapping[str, Any]) -> str:
    """Hex SHA-256 binding a calibration to what it was computed with, over a bundle's raw dict: the UNet and head
    weights (and the adapted backbone's, when there is one), every fitted state (FITTED: references, feature memory,
    component scales, backbone identity; LATER_FITTED when present: the retrieval database), the config sections
    scores depend on (SEALED_CONFIG) and the threshold
    dict itself (its detection settings, components, values and data record) less SEAL_KEY."""
    digest = hashlib.sha256(f"anoddpm calibration v{SEAL_VERSION}".encode())
    config = raw.get("config") if isinstance(raw.get("config"), Mapping) else {}
    threshold = {k: v for k, v in (raw.get("threshold") or {}).items() if k != SEAL_KEY}
    later = {key: raw[key] for key in ("adapted_backbone", *LATER_FITTED) if raw.get(key) is not None}
    _feed(digest, {"state_dict": raw.get("state_dict"), "head_state_dict": raw.get("head_state_dict"), **later,
                   **{key: raw.get(key) for key in FITTED}, "config": {k: config.get(k) for k in SEALED_CONFIG},
                   "threshold": threshold})
    return digest.hexdigest()


def check_calibration(path: Path, raw: Mapping[str, Any], cfg: Config) -> None:
    """The calibration of `path` (threshold and fitted states) is well formed and, when sealed, belongs to this
    bundle's weights and fitted states; ValueError saying to recalibrate otherwise. Bundles written before
    calibrations were sealed (no "calibration_seal") load unchecked by the fingerprint, as they always did."""
    threshold = raw.get("threshold")
    problem = threshold_problem(threshold) or fitted_problem(raw, cfg)
    if problem is None and threshold is not None:
        sealed = threshold.get(SEAL_KEY)
        if sealed is None and raw.get("calibration_seal"):
            problem = ("threshold carries no calibration fingerprint although this file's calibrations are sealed "
                       "(a threshold copied from an older bundle?)")
        elif sealed is not None and sealed != calibration_fingerprint(raw):
            problem = ("calibration does not belong to its weights and fitted states (the threshold, a reference or "
                       "the feature memory was copied from another bundle or altered)")
    if problem is not None:
        raise ValueError(f"{path}: its {problem}; {_recalibrate(path)}")
