"""Anomaly map and image score from an image and its reconstruction, in torch.

These run inside the exported ONNX graph, so only export-friendly ops: fixed-kernel conv2d
with reflect padding for every Gaussian window, torch.topk for the top-k score.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from anoddpm.config import RESIDUAL_NORMS, RESIDUALS, SCORE_REDUCTIONS

SSIM_SIGMA = 1.5  # Gaussian window of the local SSIM statistics (Wang et al. 2004)
SSIM_C1 = 0.01**2  # stabilisers for data range 1
SSIM_C2 = 0.03**2
BRIGHTNESS_SIGMA = 4.0  # Gaussian window of the local grey level a "brightness" residual is relative to, pixels
BRIGHTNESS_FLOOR = 0.1  # added to that grey level ([0, 1]), so dark regions are not amplified without bound


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of x [N, C, H, W] per channel, radius ceil(3 sigma), reflect padding."""
    if sigma <= 0:
        return x
    n, c, h, w = x.shape
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = x.reshape(-1, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(-1, c, h, w)


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """Local SSIM per pixel and channel of a, b [B, C, H, W] in [0, 1] -> [B, C, H, W] (1 = identical)."""
    blur = lambda v: gaussian_blur(v, SSIM_SIGMA)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return num / den


def anomaly_map(images: Tensor, reconstructions: Tensor, residual: str = "l2", sigma: float = 4.0,
                norm: str = "none") -> Tensor:
    """Per-pixel residual of images vs reconstructions [B, C, H, W] in [0, 1], channel mean, blurred -> [B, 1, H, W].

    residual: 'l2' squared error, 'l1' absolute error, 'ssim' 1 - local SSIM; sigma 0 = no blur.
    norm: 'none', or 'brightness' = divided by the images' local mean grey level plus BRIGHTNESS_FLOOR.
    """
    if residual == "l2":
        diff = (images - reconstructions) ** 2
    elif residual == "l1":
        diff = (images - reconstructions).abs()
    elif residual == "ssim":
        diff = 1.0 - ssim_map(images, reconstructions)
    else:
        raise ValueError(f"detect.residual={residual!r} is not allowed; choose one of {', '.join(RESIDUALS)}")
    amap = gaussian_blur(diff.mean(dim=1, keepdim=True), sigma)
    if norm == "none":
        return amap
    if norm == "brightness":
        return amap / (gaussian_blur(images.mean(dim=1, keepdim=True), BRIGHTNESS_SIGMA) + BRIGHTNESS_FLOOR)
    raise ValueError(f"detect.residual_norm={norm!r} is not allowed; choose one of {', '.join(RESIDUAL_NORMS)}")


def image_score(amap: Tensor, reduction: str = "max", topk: int = 100) -> Tensor:
    """Image score [B] from an anomaly map [B, 1, H, W]: its max, or the mean of its top-k pixels."""
    flat = amap.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "topk":
        if topk < 1:
            raise ValueError(f"detect.topk={topk} must be at least 1")
        return torch.topk(flat, min(topk, amap.shape[-1] * amap.shape[-2]), dim=1).values.mean(dim=1)
    raise ValueError(f"detect.score={reduction!r} is not allowed; choose one of {', '.join(SCORE_REDUCTIONS)}")
