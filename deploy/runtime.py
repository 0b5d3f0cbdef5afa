"""The line runtime: an exported model.onnx -> per-image score, label, anomaly map and mask.

numpy + onnxruntime + anoddpm.data.imageio only (no torch), so a line PC needs only
deploy/requirements.txt. Images are read and resized by the same ``preprocess()`` as training;
the threshold and the preprocessing travel inside the ONNX metadata.

A tiled model (``data.tile_size`` T > 0 in its preprocessing) keeps the graph at one batch of T x T tiles:
the Inspector rescales each image by ``tile_scale``, cuts, stitches and scores it with ``eval.tiling`` (the
module the PyTorch path uses) and returns maps of each input's own size.
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from anoddpm.data.imageio import (RESIZE_POLICIES, array_image, as_image_list, load_model_image, model_image, read_any,
                             resize_map)
from deploy.integrity import check_integrity
from eval.tiling import Stitcher, image_score, tile_batches

ONNX_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "pred_score")
_JSON_KEYS = ("config", "threshold", "preprocessing", "fingerprint")
_AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def parse_metadata(raw: dict[str, str], path: str | Path) -> dict[str, Any]:
    """ONNX metadata_props (strings) -> dict with JSON fields decoded; ValueError naming `path`."""
    version = raw.get("anoddpm_format_version")
    if version is None:
        raise ValueError(f"{path} is not an anoddpm ONNX model: no anoddpm_format_version in its metadata "
                         "(export it with `anoddpm export`)")
    if version != str(ONNX_FORMAT_VERSION):
        raise ValueError(f"{path} has anoddpm_format_version {version!r}; this runtime reads only "
                         f"{ONNX_FORMAT_VERSION} (re-export the model or upgrade anoddpm)")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in _JSON_KEYS:
            meta[key] = json.loads(raw[key])
        meta["steps"] = int(raw["steps"])
    except KeyError as err:
        raise ValueError(f"{path} metadata lacks the field {err.args[0]!r}") from err
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} metadata is not valid: {err}; re-export the model") from err
    _check_preprocessing(meta, path)
    _check_threshold(meta, path)
    return meta


def _check_threshold(meta: dict[str, Any], path: str | Path) -> None:
    """A finite image (and pixel) threshold, detection settings that are JSON objects, a known score mode: a NaN
    threshold would pass every part, +inf flag none."""
    threshold = meta["threshold"]
    if not isinstance(threshold, dict) or not isinstance(threshold.get("image"), (int, float)):
        raise ValueError(f"{path} metadata holds no image threshold; calibrate the bundle and re-export")
    for key in ("image", "pixel"):
        value = threshold.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise ValueError(f"{path} metadata threshold.{key}={value!r} is not a finite number (it would decide no "
                             "part correctly); recalibrate the bundle and re-export")
    detect = meta["config"].get("detect", {})
    if not isinstance(threshold.get("detect", {}), dict) or not isinstance(detect, dict):
        raise ValueError(f"{path} metadata threshold.detect and config.detect must be JSON objects; re-export the "
                         "model")
    topk = detect.get("topk", 100)
    if detect.get("score", "max") not in ("max", "topk") or not isinstance(topk, int) or isinstance(topk, bool) \
            or topk < 1:
        raise ValueError(f"{path} metadata config.detect score={detect.get('score')!r} / topk={topk!r} is not valid "
                         "(score max or topk, topk a positive integer); re-export the model")


def _check_preprocessing(meta: dict[str, Any], path: str | Path) -> None:
    """ValueError naming the metadata field that is not what `anoddpm export` writes."""
    for key in ("config", "preprocessing", "fingerprint"):
        if not isinstance(meta[key], dict):
            raise ValueError(f"{path} metadata field {key!r} must be a JSON object, got {type(meta[key]).__name__}; "
                             "re-export the model")
    prep = meta["preprocessing"]
    for key, low, default in (("image_size", 1, None), ("channels", 1, None), ("tile_size", 0, 0), ("tile_stride", 0, 0)):
        value = prep.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{path} metadata preprocessing.{key}={value!r} must be an integer >= {low}; "
                             "re-export the model")
    scale = prep.get("tile_scale", 1.0)
    if (prep["channels"] not in (1, 3) or prep.get("resize_policy") not in RESIZE_POLICIES
            or not isinstance(scale, (int, float)) or not 0 < scale <= 1):
        raise ValueError(f"{path} metadata preprocessing {prep} is not valid (channels 1 or 3, resize_policy one of "
                         f"{', '.join(RESIZE_POLICIES)}, tile_scale in (0, 1]); re-export the model")


def _check_graph_input(session: ort.InferenceSession, channels: int, side: int, path: Path) -> None:
    """The graph's input [B, C, S, S] must be the one its metadata describes, or every image would fail."""
    shape = session.get_inputs()[0].shape
    fixed = [d for d in shape[1:] if isinstance(d, int)]
    if len(shape) != 4 or (len(fixed) == 3 and fixed != [channels, side, side]):
        raise ValueError(f"{path}: its metadata describes input [B, {channels}, {side}, {side}] but the graph takes "
                         f"{shape}; the file was altered, re-export the model")


def thresholds(threshold: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """A calibrated threshold dict -> (image threshold, pixel threshold); (None, None) when uncalibrated.

    Without a calibrated pixel threshold the image one is used: with the max score a pixel is then
    marked exactly when the image is NG.
    """
    if threshold is None or threshold.get("image") is None:
        return None, None
    pixel = threshold.get("pixel")
    return float(threshold["image"]), float(pixel) if pixel is not None else float(threshold["image"])


def check_finite(score: float, amap: np.ndarray, where: str) -> None:
    """ValueError naming `where` when an image's score or any pixel of its map is not a finite number: such a
    value never becomes a label (weights or input are broken)."""
    amap = np.asarray(amap)
    bad = int(amap.size - np.count_nonzero(np.isfinite(amap)))
    if not np.isfinite(score) or bad:
        raise ValueError(f"{where}: the model's output is not a finite number (score {float(score)}, {bad} "
                         "non-finite map pixel(s)); no verdict (check the model with `anoddpm info`, and the image)")


def verdict(score: float, amap: np.ndarray, image_threshold: float | None,
            pixel_threshold: float | None) -> tuple[bool | None, np.ndarray | None]:
    """The label rule: (pred_label = score > image threshold, pred_mask = map > pixel threshold), None uncalibrated."""
    if image_threshold is None or pixel_threshold is None:
        return None, None
    return bool(score > image_threshold), np.asarray(amap) > pixel_threshold


def _session(path: Path, providers: Sequence[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    if providers:
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(f"providers {', '.join(unknown)} are not available in this onnxruntime; "
                             f"available: {', '.join(available)}")
        wanted = list(providers)
    else:
        wanted = [p for p in _AUTO_PROVIDERS if p in available]
    try:
        if not providers and "CUDAExecutionProvider" in wanted:
            # onnxruntime-gpu lists CUDA even where its libraries cannot load; it then logs an error
            # and falls back. Quiet that: the fallback is normal on a CPU-only line PC.
            ort.set_default_logger_severity(4)
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise ValueError(f"{path} is not a loadable ONNX model (truncated or corrupted?): {err}") from err
    finally:
        ort.set_default_logger_severity(2)
    active = session.get_providers()
    if providers and not set(providers) & set(active):
        raise ValueError(f"none of the providers {', '.join(providers)} could be used for {path}; "
                         f"onnxruntime fell back to {', '.join(active)}")
    return session


class Inspector:
    """An exported model.onnx ready to inspect images; `.provider` is the provider really in use.

    `threads` sets onnxruntime's intra-op threads (default: onnxruntime's choice, the physical cores).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, batch_size: int = 8,
                 threads: int | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; pass the .onnx file `anoddpm export` wrote")
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        if zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is a PyTorch bundle (model.pt), not an ONNX model; export it first: "
                             f"anoddpm export --model {self.path} --out model.onnx")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.session = _session(self.path, providers, threads)
        self.provider = self.session.get_providers()[0]
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        prep = self.metadata["preprocessing"]
        self.image_size = int(prep["image_size"])
        self.channels = int(prep["channels"])
        self.resize_policy = str(prep["resize_policy"])
        self.tile_size = int(prep.get("tile_size", 0))  # models exported before tiling have none
        self.tile_scale = float(prep.get("tile_scale", 1.0))
        self.tile_stride = int(prep.get("tile_stride", 0))
        detect = self.metadata["config"].get("detect", {})
        self.score_reduction, self.topk = str(detect.get("score", "max")), int(detect.get("topk", 100))
        self.input_side = self.tile_size or self.image_size
        _check_graph_input(self.session, self.channels, self.input_side, self.path)
        self.image_threshold, self.pixel_threshold = thresholds(self.metadata["threshold"])
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise ValueError(f"{self.path} lacks the output(s) {', '.join(missing)}")
        check_integrity(self.path, self.session.get_modelmeta().custom_metadata_map)  # metadata bound to the graph

    def load(self, path: str | Path) -> np.ndarray:
        """Read one image file -> float32 [C, S, S] in [0, 1] (tiled: [C, h, w] rescaled), exactly as in training."""
        return load_model_image(path, self.channels, self.image_size, self.resize_policy, self.tile_size,
                                self.tile_scale)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """An in-memory image [H, W] / [H, W, C] (uint8, uint16 or float [0, 1]; C = 1, 3 or 4) -> float32
        [C, S, S] (tiled: [C, h, w]), its channels converted like a file's."""
        return model_image(array_image(image, self.channels), self.image_size, self.resize_policy, self.tile_size,
                           self.tile_scale)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, C, S, S] in [0, 1] -> (anomaly_map [B, S, S], pred_score [B]), in `batch_size` chunks
        (S = the tile size for a tiled model: a batch of tiles)."""
        expected = (self.channels, self.input_side, self.input_side)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"batch of shape {batch.shape} does not fit this model: it needs [B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}]")
        maps, scores = [], []
        for start in range(0, len(batch), self.batch_size):
            chunk = np.ascontiguousarray(batch[start:start + self.batch_size], dtype=np.float32)
            amap, score = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
            maps.append(amap[:, 0])
            scores.append(score)
        if not maps:
            return np.zeros((0, *expected[1:]), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps), np.concatenate(scores)

    def score_image(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Tiled model: one image [C, h, w] in [0, 1] -> (stitched anomaly map float32 [h, w], image score)."""
        if not self.tile_size:
            raise ValueError(f"{self.path} is not a tiled model (its data.tile_size is 0); use run()")
        maps = Stitcher(1, image.shape[1], image.shape[2], self.tile_size)
        for tiles, offsets in tile_batches(image, self.tile_size, self.tile_stride, self.batch_size):
            maps.add(self.run(tiles)[0][:, None], offsets)
        amap = maps.result()[0]
        return amap, image_score(amap, self.score_reduction, self.topk)

    def results(self, batch: np.ndarray | Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None,
                names: Sequence[str] | None = None, errors: str = "raise") -> list[dict[str, Any]]:
        """float32 [B, C, S, S] -> one dict per image: pred_score, pred_label, anomaly_map [S, S], pred_mask.

        A tiled model takes B prepared images [C, h_i, w_i] and returns maps of `sizes` [(H_i, W_i)], the
        inputs' own sizes (default: the prepared sizes). A non-finite score or map (``check_finite``) raises
        ValueError naming the image (`names`, default its place in the batch); with ``errors="record"`` that
        image's dict is ``{"error": message}`` instead and the others keep their results."""
        if errors not in ("raise", "record"):
            raise ValueError(f"errors={errors!r} is not allowed; choose raise or record")
        if self.tile_size:
            sizes = sizes or [tuple(x.shape[1:]) for x in batch]
            scored = [self.score_image(np.asarray(x, np.float32)) for x in batch]
            maps, scores = [resize_map(amap, *size) for (amap, _), size in zip(scored, sizes)], [s for _, s in scored]
        else:
            maps, scores = self.run(np.asarray(batch))
        results: list[dict[str, Any]] = []
        for k, (amap, score) in enumerate(zip(maps, scores)):
            try:
                check_finite(float(score), amap, names[k] if names else f"image {k} of the batch")
            except ValueError as err:
                if errors == "raise":
                    raise
                results.append({"error": str(err)})
                continue
            label, mask = verdict(float(score), amap, self.image_threshold, self.pixel_threshold)
            results.append({"pred_score": float(score), "pred_label": label, "anomaly_map": amap, "pred_mask": mask})
        return results

    def inspect(self, images: str | Path | np.ndarray | Sequence[str | Path | np.ndarray]) -> list[dict[str, Any]]:
        """One image or a list of image paths, PIL images and/or arrays -> one result dict per image (see
        `results`), plus `path` (None for in-memory images).

        A file that cannot be read, and an image whose score or map is not finite, raise ValueError (or
        FileNotFoundError) naming it. A tiled model returns maps and masks of each input's own size.
        """
        images = as_image_list(images)
        out: list[dict[str, Any]] = []
        for start in range(0, len(images), self.batch_size):
            items = images[start:start + self.batch_size]
            originals = [read_any(x, self.channels) for x in items]
            batch = [_model_image(x, item, self) for x, item in zip(originals, items)]
            sizes = [x.shape[:2] for x in originals]
            names = [str(x) if isinstance(x, (str, Path)) else f"image {start + k} of the input"
                     for k, x in enumerate(items)]
            for item, result in zip(items, self.results(batch if self.tile_size else np.stack(batch), sizes, names)):
                result["path"] = str(item) if isinstance(item, (str, Path)) else None
                out.append(result)
        return out


def _model_image(image: np.ndarray, item: Any, inspector: Inspector) -> np.ndarray:
    """model_image with the inspector's preprocessing; a ValueError names the file it came from."""
    try:
        return model_image(image, inspector.image_size, inspector.resize_policy, inspector.tile_size,
                           inspector.tile_scale)
    except ValueError as err:
        if isinstance(item, (str, Path)):
            raise ValueError(f"{item}: {err}") from err
        raise
