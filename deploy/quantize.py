"""`anoddpm export --quantize int8`: static INT8 quantisation of an exported inspection graph.

The float graph's convolutions (the UNet's and the backbone's: nearly all of its arithmetic) are quantised with
onnxruntime's static quantiser (QDQ format, weights per output channel, symmetric int8; activations int8 with
ranges from MinMax calibration), calibrated on the bundle's held-back good images, the images its threshold
comes from. The threshold is then recalibrated on the quantised graph's own scores of those images, run through
the line runtime (``deploy.runtime.Inspector``, tiles stitched as on the line), never taken from the float graph:
quantisation moves every score. The metadata says ``quantize: int8`` and the integrity hash binds it as export
does. Nothing is written when a score of the quantised graph is not a finite number, nor when the quantised graph
separates synthetic anomalies of those good images (``data.anomalies``) worse than the float graph by more than
QUALITY_TOLERANCE image AUROC (``threshold["int8_check"]`` keeps both figures).
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from sklearn.metrics import roc_auc_score

from deploy.integrity import INTEGRITY_KEY, graph_bytes, integrity_hash
from deploy.runtime import INPUT_NAME, Inspector, parse_metadata
from eval.threshold import calibrate

QUANTIZE_KEY = "quantize"
QUALITY_TOLERANCE = 0.005  # image AUROC the INT8 graph may lose to the float graph on the synthetic-anomaly check
CHECK_SEED = 0
QUANTIZED_OPS = ("Conv",)  # the networks' arithmetic; the rest (norms, softmax, the memory search) stays float
# the networks (the UNet, the backbone); the map's smoothing and pooling convolutions stay float: in int8 they would
# round every anomaly map, hence every score, to 256 levels
QUANTIZED_SCOPES = ("/detector/reconstructor/", "/detector/backbone/")
CALIBRATION_BATCH = 8


class _GoodImages:
    """onnxruntime CalibrationDataReader over model inputs [N, C, S, S] float32, in batches."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(inputs, max(1, math.ceil(len(inputs) /
                                                                                          CALIBRATION_BATCH))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def quantized_graph(float_path: Path, calibration_inputs: np.ndarray, workdir: Path) -> onnx.ModelProto:
    """The float ONNX file at `float_path` with its Conv nodes quantised (QDQ, per channel), activation ranges from
    `calibration_inputs` [N, C, S, S] float32 in [0, 1]; metadata_props as in the float file."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_inputs) == 0:
        raise ValueError("INT8 quantisation needs held-back good images to calibrate on; the bundle has none")
    prepared, out = workdir / "prepared.onnx", workdir / "int8.onnx"
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    nodes = [n.name for n in onnx.load(str(prepared)).graph.node
             if n.op_type in QUANTIZED_OPS and n.name.startswith(QUANTIZED_SCOPES)]
    quantize_static(str(prepared), str(out), _GoodImages(calibration_inputs), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(str(out))


def _with_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """`model` serialised with exactly `metadata` and the integrity hash over them and its graph."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        if key != INTEGRITY_KEY:
            model.metadata_props.add(key=key, value=value)
    kept = {key: value for key, value in metadata.items() if key != INTEGRITY_KEY}
    model.metadata_props.add(key=INTEGRITY_KEY, value=integrity_hash(graph_bytes(model.SerializeToString()), kept))
    return model.SerializeToString()


def good_scores(path: Path, images: Sequence[np.ndarray], batch_size: int = CALIBRATION_BATCH
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores [N] and maps (N of [S, S], or the images' own sizes when tiled) of `images` ([C, S, S] float32 in
    [0, 1], prepared as the runtime prepares files) through the ONNX file at `path`; ValueError when one is not
    a finite number."""
    inspector = Inspector(path, providers=["CPUExecutionProvider"], batch_size=batch_size)
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        batch = chunk if inspector.tile_size else np.stack(chunk)
        for result in inspector.results(batch, names=[f"held-back good image {start + j}" for j in range(len(chunk))]):
            scores.append(result["pred_score"])
            maps.append(result["anomaly_map"])
    return np.asarray(scores, np.float64), maps


def synthetic_anomalies(good_images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One synthetic-anomaly version ([C, S, S] float32 in [0, 1], never clean) of each good image, seeded."""
    import torch

    from anoddpm.data.anomalies import synthesize_anomalies

    generator = torch.Generator().manual_seed(CHECK_SEED)
    return [synthesize_anomalies(torch.from_numpy(np.asarray(a, np.float32))[None], generator, clean_fraction=0.0)[0][0]
            .numpy() for a in good_images]


def quality_check(float_scores: np.ndarray, int8_scores: np.ndarray, n_good: int) -> dict[str, float]:
    """Image AUROC of the float and the INT8 graph's scores [N] of `n_good` good images followed by their
    synthetic-anomaly versions (``synthetic_anomalies``) -> {"float_auroc", "int8_auroc", "images"}."""
    labels = np.r_[np.zeros(n_good), np.ones(len(float_scores) - n_good)]
    return {"float_auroc": float(roc_auc_score(labels, float_scores)),
            "int8_auroc": float(roc_auc_score(labels, int8_scores)), "images": int(len(labels))}


def int8_threshold(float_threshold: dict[str, Any], scores: np.ndarray, maps: Sequence[np.ndarray],
                   quantile: float) -> dict[str, Any]:
    """The float export's threshold dict with image / pixel thresholds recalibrated on the INT8 graph's good scores
    and maps (quantile method); the float graph's cached good scores are dropped (they are another graph's)."""
    own = calibrate(scores, list(maps), quantile=quantile)
    threshold = {key: value for key, value in float_threshold.items() if key != "good_cache"}
    threshold.update(own)
    threshold[QUANTIZE_KEY] = "int8"
    return threshold


def quantize_export(float_path: Path, out_path: Path, calibration_inputs: np.ndarray,
                    good_images: Sequence[np.ndarray], quantile: float) -> tuple[bytes, dict[str, Any]]:
    """INT8 file bytes for the exported float graph at `float_path` (metadata included, threshold recalibrated on
    `good_images` through the quantised graph) and that threshold; `calibration_inputs` [N, C, S, S] are the model
    inputs the activation ranges come from (tiles when tiled). Nothing is written to `out_path` here."""
    float_model = onnx.load(str(float_path))
    metadata = {p.key: p.value for p in float_model.metadata_props}
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        workdir = Path(tmp)
        model = quantized_graph(float_path, calibration_inputs, workdir)
        provisional = workdir / "provisional.onnx"
        provisional.write_bytes(_with_metadata(model, {**metadata, QUANTIZE_KEY: "int8"}))
        checked = [*good_images, *synthetic_anomalies(good_images)]  # one pass of each graph over both sets
        int8_scores, int8_maps = good_scores(provisional, checked)
        check = quality_check(good_scores(float_path, checked)[0], int8_scores, len(good_images))
    scores, maps = int8_scores[:len(good_images)], int8_maps[:len(good_images)]
    if check["int8_auroc"] < check["float_auroc"] - QUALITY_TOLERANCE:
        raise ValueError(f"--quantize int8: the INT8 graph separates synthetic anomalies of the held-back good images "
                         f"with image AUROC {check['int8_auroc']:.4f} against the float graph's {check['float_auroc']:.4f} "
                         f"(more than {QUALITY_TOLERANCE} lost); nothing was written: export without --quantize")
    threshold = int8_threshold(json.loads(metadata["threshold"]), scores, maps, quantile)
    threshold["int8_check"] = check
    if not math.isfinite(float(threshold["image"])):
        raise ValueError(f"{out_path}: the INT8 graph's threshold is {threshold['image']}; nothing was written")
    final = _with_metadata(model, {**metadata, "threshold": json.dumps(threshold), QUANTIZE_KEY: "int8"})
    parse_metadata({p.key: p.value for p in onnx.load_from_string(final).metadata_props}, out_path)
    return final, threshold
