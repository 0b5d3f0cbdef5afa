"""`anoddpm info --model PATH` (or `info PATH`): what a model bundle (model.pt) or an exported model.onnx contains."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def describe_bundle(path: Path) -> dict[str, Any]:
    """Summary of a model.pt: versions, config, threshold, map reference, backbone and feature memory, fingerprint,
    parameter counts (``head_parameters`` None = no scoring head: trained without one, or dropped by its check;
    ``backbone`` None = no feature component was calibrated; ``few_shot`` None = trained on all good images, else K,
    the seed and the shot files, and whether its threshold came from leave-one-out scores). A calibration the bundle would be refused for (not
    finite, malformed, not this bundle's) is shown as none, with ``calibration_problem`` saying why (and a warning)."""
    from anoddpm.bundle import load_bundle

    bundle = load_bundle(path, drop_bad_calibration=True)
    n_params = sum(int(t.numel()) for t in bundle.state_dict.values() if t.is_floating_point())
    reference = None
    if bundle.map_reference is not None:
        ref = bundle.map_reference.float()
        reference = {"shape": list(ref.shape), "min": float(ref.min()), "mean": float(ref.mean()), "max": float(ref.max())}
    if bundle.reference_bank is not None:
        features, maps = bundle.reference_bank["features"], bundle.reference_bank["maps"]
        reference = {**(reference or {}), "bank_images": int(features.shape[0]), "bank_maps_shape": list(maps.shape)}
    backbone = None
    if bundle.backbone is not None:
        memory = bundle.feature_memory
        backbone = {**bundle.backbone, "layers": list(bundle.cfg.backbone.layers),
                    "image_size": bundle.cfg.backbone.image_size,
                    "feature_memory_shape": None if memory is None else list(memory.shape)}
    head = bundle.head_state_dict
    head_params = None if head is None else sum(int(t.numel()) for t in head.values() if t.is_floating_point())
    return {"file": str(path), "kind": "bundle", "versions": bundle.versions, "parameters": n_params,
            "head_parameters": head_params,
            "adapted_backbone_parameters": None if bundle.adapted_backbone is None
            else sum(int(t.numel()) for t in bundle.adapted_backbone.values()),
            "threshold": _readable(bundle.threshold), "calibration_problem": bundle.calibration_problem,
            "map_reference": reference, "backbone": backbone,
            "component_scale": None if bundle.component_scale is None else bundle.component_scale.tolist(),
            "few_shot": _few_shot(bundle), "retrieval": _retrieval(bundle),
            "fingerprint": bundle.fingerprint,
            "config": bundle.cfg.to_dict()}


def _retrieval(bundle: Any) -> dict[str, Any] | None:
    """{"neighbours", "images", "megabytes"} of a retrieval-conditioned bundle's database (images None when not
    fitted), else None."""
    if bundle.cfg.model.condition != "retrieval":
        return None
    database = bundle.retrieval
    size = None if database is None else sum(t.numel() * t.element_size() for t in database.values()) / 2**20
    return {"neighbours": bundle.cfg.model.retrieval_neighbours,
            "images": None if database is None else int(database["images"].shape[0]),
            "megabytes": None if size is None else round(size, 2)}


def _few_shot(bundle: Any) -> dict[str, Any] | None:
    """{"shots", "shots_seed", "shot_files", "leave_one_out"} of a K-shot bundle (data.shots >= 1), or of a
    bundle calibrated on K shots (`calibrate --shots`, with "trained_on_shots" false), else None."""
    threshold = bundle.threshold if isinstance(bundle.threshold, dict) else {}
    if isinstance(threshold.get("few_shot"), dict):
        return {**threshold["few_shot"], "leave_one_out": bool(threshold.get("leave_one_out")),
                "trained_on_shots": False}
    if not bundle.cfg.data.shots:
        return None
    return {"shots": bundle.cfg.data.shots, "shots_seed": bundle.cfg.data.shots_seed,
            "shot_files": bundle.fingerprint.get("shot_files"), "leave_one_out": bool(threshold.get("leave_one_out"))}


def describe_onnx(path: Path) -> dict[str, Any]:
    """Summary of an exported model.onnx from its metadata, inputs and outputs (no torch); refused (ValueError) when
    its metadata is not valid or does not belong to its graph (``deploy.integrity``)."""
    import onnxruntime as ort

    from deploy.integrity import check_integrity
    from deploy.runtime import parse_metadata

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise ValueError(f"{path} is not a loadable ONNX model (truncated or corrupted?): {err}") from err
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    check_integrity(path, session.get_modelmeta().custom_metadata_map)
    io = {
        "inputs": {i.name: list(map(str, i.shape)) for i in session.get_inputs()},
        "outputs": {o.name: list(map(str, o.shape)) for o in session.get_outputs()},
    }
    if isinstance(meta.get("threshold"), dict):
        meta = {**meta, "threshold": _readable(meta["threshold"])}
    return {"file": str(path), "kind": "onnx", **io, **meta}


def _readable(threshold: Any) -> Any:
    """The threshold dict with its cached good scores (``good_cache.scores``, up to 1001 numbers) shown as a count."""
    if not isinstance(threshold, dict) or not isinstance(threshold.get("good_cache"), dict):
        return threshold
    cache = dict(threshold["good_cache"])
    if isinstance(cache.get("scores"), list):
        cache["scores"] = f"{len(cache['scores'])} cached good scores"
    return {**threshold, "good_cache": cache}


def describe(path: str | Path) -> dict[str, Any]:
    """Dispatch on the file: ONNX by suffix, everything else is read as a bundle."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the model.pt or .onnx file in it")
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    return describe_onnx(path) if path.suffix.lower() == ".onnx" else describe_bundle(path)


def info_command(args: argparse.Namespace) -> int:
    """Print the description of the file given as PATH or --model (exactly one) as indented JSON."""
    given = [x for x in (args.path, getattr(args, "model", None)) if x]
    if len(given) != 1:
        raise ValueError("name the model file once: `anoddpm info --model FILE` (or `anoddpm info FILE`)")
    print(json.dumps(describe(given[0]), indent=2, default=str))
    return 0
