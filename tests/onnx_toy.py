"""A toy detector exported with real anoddpm metadata, for fast runtime/inspect tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anoddpm.config import Config
from anoddpm.data.imageio import save_png
from deploy.export import export_module, onnx_metadata

SIZE = 32
THRESHOLD = 0.01


class ToyDetector(nn.Module):
    """Reconstruction = 5x5 box blur; map = squared residual; score = max of the map."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
        amap = ((images - recon) ** 2).mean(1, keepdim=True)
        return amap, amap.amax(dim=(1, 2, 3))


def make_toy_onnx(path: Path, threshold: dict | None = None) -> Path:
    """Export ToyDetector at 32 px grey with anoddpm metadata."""
    cfg = Config().override("data", image_size=SIZE, channels=1).override("model", preset="tiny")
    thr = threshold or {"image": THRESHOLD, "pixel": None, "method": "quantile"}
    return export_module(ToyDetector(), path, channels=1, image_size=SIZE,
                         metadata=onnx_metadata(cfg, thr, {"source": "toy"}))


def good_image(seed: int = 0) -> np.ndarray:
    """A smooth grey gradient [48, 40] in [0, 1] (score well below THRESHOLD)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:40].astype(np.float32)
    return (0.2 + 0.3 * yy / 48 + 0.2 * xx / 40 + 0.05 * rng.random()).astype(np.float32)


def defect_image(seed: int = 0) -> np.ndarray:
    """good_image with a bright square (score well above THRESHOLD)."""
    img = good_image(seed)
    img[20:26, 16:22] = 1.0
    return img


def write_png(path: Path, img: np.ndarray) -> Path:
    """Save a float [H, W] image as 8-bit PNG."""
    save_png(path, img)
    return path


def with_metadata(src: Path, dst: Path, **values: str) -> Path:
    """A copy of the ONNX file `src` at `dst` with the metadata values given replaced (the graph unchanged)."""
    import onnx

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key in values:
            prop.value = values[prop.key]
    onnx.save(model, str(dst))
    return dst
