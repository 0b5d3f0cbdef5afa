"""The Python API: ``anoddpm.load(path)`` -> a ``Model`` whose ``predict`` scores images in memory or on disk.

    import anoddpm
    model = anoddpm.load("runs/bottle/model.pt")      # or an exported model.onnx (no torch needed)
    result = model.predict("part.png")                # a path, PIL image, numpy array or a list of these
    result.pred_score, result.pred_label, result.anomaly_map, result.pred_mask

Every step is the one the CLI uses: the same ``preprocess()``, the bundle's ``Detector`` (under
``torch.inference_mode``) or the ONNX ``deploy.runtime.Inspector``, and the same label rule
(``deploy.runtime.verdict``). The map comes back at the input image's size (bilinear, inverse of the
resize policy's geometry); ``pred_mask`` is that map above the pixel threshold. A tiled model
(``data.tile_size`` > 0) scores each image tile by tile at its own (scaled) size and stitches the map.

A value that is not a finite number never becomes a label: an image with NaN or infinite pixels, or whose score
or map comes out non-finite (broken weights), raises ValueError naming it (``deploy.runtime.check_finite``);
``pred_label`` is None only when the model has no usable threshold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anoddpm.data.imageio import as_image_list, preprocess, read_any, rescale, resize_map, restore_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One image's result; maps are at the input image's size [H, W]."""

    pred_score: float  # image score, in map units (higher = more anomalous)
    pred_label: bool | None  # pred_score > image threshold (True = defect); None when the model has no usable threshold
    anomaly_map: np.ndarray  # float32 [H, W], >= 0
    pred_mask: np.ndarray | None  # bool [H, W]: anomaly_map > pixel threshold; None without a usable threshold
    path: str | None = None  # the file, for inputs given as paths


class _TorchBackend:
    """A model.pt bundle through ``Detector``: run(batch [B, C, S, S]) -> (maps [B, S, S], scores [B])."""

    def __init__(self, path: Path, device: str) -> None:
        from anoddpm.bundle import load_bundle
        from anoddpm.detection.detector import Detector
        from anoddpm.platform.device import resolve_device
        from anoddpm.detection.settings import calibrated_for
        from deploy.runtime import thresholds

        self.device = resolve_device(device)
        bundle = load_bundle(path, map_location=self.device)
        self.detector = Detector.from_bundle(bundle, self.device)
        data = self.detector.cfg.data
        self.image_size, self.channels, self.resize_policy = data.image_size, data.channels, data.resize_policy
        self.tile_size, self.tile_scale = data.tile_size, data.tile_scale
        threshold = bundle.threshold
        if threshold is not None and not calibrated_for(threshold, self.detector):
            log.warning("%s: its threshold was calibrated with other detection settings; pred_label and pred_mask "
                        "are None (run `anoddpm calibrate --model %s`)", path, path)
            threshold = None
        elif threshold is None:
            log.warning("%s has no threshold; pred_label and pred_mask are None (run `anoddpm calibrate`)", path)
        self.image_threshold, self.pixel_threshold = thresholds(threshold)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from anoddpm.detection.scoring_loop import forward_batch

        result = forward_batch(self.detector, batch, self.device)
        return result.maps, result.scores

    def score_image(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Tiled bundle: one image [C, h, w] -> (stitched map [h, w], score), as deploy.runtime.Inspector."""
        from anoddpm.detection.tiling import TiledDetector

        amap, score, _, _ = TiledDetector(self.detector).score_image(image, self.device)
        return amap, score


class Model:
    """A loaded model (bundle or ONNX); ``predict`` turns images into ``Prediction`` objects."""

    def __init__(self, backend: Any, path: Path, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.backend, self.path, self.batch_size = backend, path, batch_size

    @property
    def image_threshold(self) -> float | None:
        """Image-score threshold (pred_label = pred_score > it); None when the model has no usable one."""
        return self.backend.image_threshold

    @property
    def pixel_threshold(self) -> float | None:
        """Map threshold (pred_mask = anomaly_map > it); the image threshold when no pixel one was calibrated."""
        return self.backend.pixel_threshold

    def predict(self, images: Any) -> Prediction | list[Prediction]:
        """A path (str or Path), PIL image, numpy array ([H, W] or [H, W, C]; uint8, uint16 or float in [0, 1])
        -> one Prediction; a list of these (or a [B, H, W, C] array) -> a list, in order.

        Every image is read before any is scored: an unreadable one (NaN or infinite pixels included) raises
        ValueError/FileNotFoundError naming it; so does an image whose score or map is not a finite number.
        """
        items = as_image_list(images)
        b = self.backend
        originals = [read_any(x, b.channels) for x in items]
        prepared = [_prepared(x, item, k, b) for k, (x, item) in enumerate(zip(originals, items))]
        out: list[Prediction] = []
        if b.tile_size:  # native resolution: each image tiled at its own size, its map stitched
            for k, (item, image) in enumerate(zip(items, originals)):
                amap, score = b.score_image(prepared[k])
                out.append(self._prediction(item, k, image.shape[:2], amap, float(score)))
        else:
            for start in range(0, len(items), self.batch_size):
                chunk = originals[start:start + self.batch_size]
                maps, scores = b.run(np.stack(prepared[start:start + self.batch_size]))
                for k, (amap, score) in enumerate(zip(maps, scores)):
                    out.append(self._prediction(items[start + k], start + k, chunk[k].shape[:2], amap, float(score)))
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        return out[0] if single else out

    def _prediction(self, item: Any, index: int, hw: Sequence[int], amap: np.ndarray, score: float) -> Prediction:
        from deploy.runtime import check_finite, verdict

        check_finite(score, amap, _name(item, index))
        hw = (int(hw[0]), int(hw[1]))
        full = resize_map(amap, *hw) if self.backend.tile_size else restore_map(amap, hw, self.backend.resize_policy)
        label, mask = verdict(score, full, self.image_threshold, self.pixel_threshold)
        return Prediction(pred_score=score, pred_label=label, anomaly_map=full, pred_mask=mask,
                          path=str(item) if isinstance(item, (str, Path)) else None)


def _name(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"image {index} of the input"


def _prepared(image: np.ndarray, item: Any, index: int, backend: Any) -> np.ndarray:
    """An image [H, W, C] as the model sees it ([C, S, S], or [C, h, w] rescaled when tiled); ValueError naming it."""
    try:
        if backend.tile_size:
            return rescale(image, backend.tile_scale)
        return preprocess(image, backend.image_size, backend.resize_policy)
    except ValueError as err:
        raise ValueError(f"{_name(item, index)}: {err}") from err


def load(path: str | Path, device: str = "auto", batch_size: int = 8) -> Model:
    """Load a model.pt bundle (torch; `device` auto, cpu, cuda, cuda:N) or an exported .onnx (onnxruntime only,
    no torch imported; best available provider) -> Model scoring `batch_size` images per forward pass."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        from deploy.runtime import Inspector

        return Model(Inspector(path, batch_size=batch_size), path, batch_size)
    return Model(_TorchBackend(path, device), path, batch_size)
