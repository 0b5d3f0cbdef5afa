"""`anoddpm export`: bundle -> one ONNX graph of the inspection fast path, metadata inside.

Graph: ``images`` float [B, C, S, S] in [0, 1] (dynamic B) -> Detector fast path (K deterministic
steps; the detection noise is a constant drawn from the bundle's seed) -> ``anomaly_map``
[B, 1, S, S] and ``pred_score`` [B] (+ ``reconstruction`` [B, C, S, S] on request). The config,
threshold, preprocessing, data fingerprint and steps are stored as metadata_props, so the line
runtime (deploy/runtime.py) needs nothing but the file; ``integrity_sha256`` binds that metadata to the graph
(``deploy.integrity``). A bundle whose weights or threshold are not finite numbers is refused (``load_bundle``), and
so is a threshold calibrated on the fly that is not.
"""
from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from anoddpm.version import __version__
from anoddpm.platform.atomic import atomic_write_bytes
from anoddpm.config import Config
from deploy.integrity import INTEGRITY_KEY, graph_bytes, integrity_hash
from deploy.runtime import INPUT_NAME, ONNX_FORMAT_VERSION, OUTPUT_NAMES, parse_metadata

OPSET = 17
log = logging.getLogger(__name__)


def onnx_metadata(cfg: Config, threshold: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> dict[str, str]:
    """The metadata_props written into every exported model (all values strings, JSON where nested)."""
    return {
        "anoddpm_format_version": str(ONNX_FORMAT_VERSION),
        "anoddpm_version": __version__,
        "torch_version": str(torch.__version__),
        "config": json.dumps(cfg.to_dict()),
        "threshold": json.dumps(dict(threshold)),
        "preprocessing": json.dumps(cfg.data.preprocessing()),
        "fingerprint": json.dumps(dict(fingerprint)),
        "steps": str(cfg.detect.steps),
    }


def export_module(module: nn.Module, out_path: str | Path, *, channels: int, image_size: int,
                  metadata: Mapping[str, str], output_names: Sequence[str] = OUTPUT_NAMES) -> Path:
    """Trace `module` ([B, C, S, S] -> outputs named `output_names`) to ONNX with metadata; atomic write."""
    out_path = Path(out_path)
    example = torch.rand(2, channels, image_size, image_size)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    buffer = io.BytesIO()
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter notice
        torch.onnx.export(module, (example,), buffer, input_names=[INPUT_NAME], output_names=list(output_names),
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    # the graph's bytes are those the file will hold: metadata_props is another field of the model
    model.metadata_props.add(key=INTEGRITY_KEY, value=integrity_hash(graph_bytes(model.SerializeToString()), metadata))
    onnx.checker.check_model(model, full_check=True)
    parse_metadata({p.key: p.value for p in model.metadata_props}, out_path)
    return atomic_write_bytes(out_path, model.SerializeToString())


class _InspectionGraph(nn.Module):
    """Detector forward with the outputs in the exported order."""

    def __init__(self, detector: nn.Module, with_reconstruction: bool):
        super().__init__()
        self.detector = detector
        self.with_reconstruction = with_reconstruction

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anomaly_map, pred_score, reconstruction = self.detector(images)
        if self.with_reconstruction:
            return anomaly_map, pred_score, reconstruction
        return anomaly_map, pred_score


def export_onnx(bundle_path: str | Path, out_path: str | Path, steps: int | None = None,
                with_reconstruction: bool = False, quantize: str = "none") -> Path:
    """Export the bundle's fast inspection path (K = `steps` or the bundle's) to `out_path`; returns it.

    The threshold and map reference embedded are those calibrated for the exported settings: the bundle's
    own, or (other --steps, or a bundle calibrated on the paper path) recalibrated now on its held-back
    good images (``anoddpm.detection.settings``); ValueError when that is not possible. `quantize` "int8":
    the graph's convolutions in INT8 with its own threshold (``deploy.quantize``)."""
    if quantize not in ("none", "int8"):
        raise ValueError(f"--quantize {quantize!r} is not allowed; choose none or int8")
    from anoddpm.bundle import load_bundle
    from anoddpm.detection.guard import calibrated_detector

    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"--out {out_path} is a folder; give the .onnx file to write, e.g. {out_path / 'model.onnx'}")
    bundle = load_bundle(bundle_path)
    if bundle.threshold is None or bundle.threshold.get("image") is None:
        raise ValueError(f"{bundle.path} has no threshold; run `anoddpm calibrate --model {bundle.path}` first")
    view, threshold, _ = calibrated_detector(bundle, torch.device("cpu"), bundle.cfg.train.batch_size,
                                             {"steps": steps, "sampler": "ddim"}, "export")
    if not math.isfinite(float(threshold["image"])):
        raise ValueError(f"{bundle.path}: the threshold calibrated for export is {threshold['image']} (the model's "
                         "scores are not finite numbers); nothing was written")
    detector = view.detector  # tiled: calibrated tile by tile; the graph is one tile's, the runtime tiles
    cfg = detector.cfg
    names = (*OUTPUT_NAMES, "reconstruction") if with_reconstruction else OUTPUT_NAMES
    graph = _InspectionGraph(detector, with_reconstruction)
    metadata = onnx_metadata(cfg, threshold, bundle.fingerprint)
    if quantize == "none":
        return export_module(graph, out_path, channels=cfg.data.channels, image_size=cfg.data.input_side,
                             metadata=metadata, output_names=names)
    return _export_int8(bundle, view, graph, out_path, metadata, names)


def _export_int8(bundle: Any, view: Any, graph: nn.Module, out_path: Path, metadata: Mapping[str, str],
                 names: Sequence[str]) -> Path:
    """The float graph exported to a temporary file, quantised (``deploy.quantize``) on the bundle's held-back good
    images, written to `out_path` with the threshold of its own scores."""
    from anoddpm.data.datasets import load_training_data
    from anoddpm.detection.calibration import training_root
    from deploy.quantize import quantize_export

    cfg = view.detector.cfg
    root, category = training_root(bundle, None, None)
    _, held_back, _ = load_training_data(bundle.cfg, root, category, bundle.cfg.train.seed)
    if len(held_back) == 0:
        raise ValueError(f"--quantize int8: {bundle.path} has no held-back good images under {root} to calibrate the "
                         "INT8 graph on (a K-shot model keeps none); export it without --quantize")
    images = [np.asarray(held_back.arrays[i], np.float32) for i in range(len(held_back))]
    inputs = view.model_inputs(held_back)
    inputs = np.stack([np.asarray(inputs[i], np.float32) for i in range(len(inputs))])
    threshold = json.loads(metadata["threshold"])
    quantile = threshold.get("quantile") if threshold.get("method") == "quantile" else None
    if quantile is None:
        quantile = cfg.detect.threshold_quantile
        log.warning("--quantize int8: the bundle's %s threshold is replaced by the %.4g quantile of the INT8 graph's "
                    "good scores", threshold.get("method"), quantile)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".float-") as tmp:
        float_path = export_module(graph, Path(tmp) / "float.onnx", channels=cfg.data.channels,
                                   image_size=cfg.data.input_side, metadata=metadata, output_names=names)
        data, _ = quantize_export(float_path, out_path, inputs, images, float(quantile))
    return atomic_write_bytes(out_path, data)
