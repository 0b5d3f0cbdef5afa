"""Per-image map reference from the nearest good images (``detect.map_reference`` 'nearest_good'), in torch.

One mean map of good images ('good_mean') cannot serve good images that differ in layout or exposure: on
magnetic_tile the highest-scoring good images were whole-tile views, whose arched tile edges most training
images do not show. Here each image's reference is the mean component map of the k training images
nearest to it in a coarse grey thumbnail, plus ``REFERENCE_FLOOR`` times that mean's spatial mean, as in
``eval.threshold.reference_map``. The bank (thumbnails and pooled maps of the training images) is fitted at
calibration and stored in the bundle; the search runs inside the exported ONNX graph (MatMul, TopK, Gather).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from eval.threshold import REFERENCE_FLOOR

THUMBNAIL_SIDE = 16  # side of the grey thumbnail images are compared by, pixels (a divisor of the image side)
BANK_POOL = 4  # the bank keeps component maps average-pooled by this factor (the maps are blurred, sigma 4)
BANK_MAX_IMAGES = 1000  # larger training splits (NFBS slices) give an evenly spaced subset: bounded time and size


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def thumbnail_length(side: int) -> int:
    """Length of the thumbnail feature vector of images of side `side` pixels."""
    return _largest_divisor(side, THUMBNAIL_SIDE) ** 2


def thumbnail_features(images: Tensor) -> Tensor:
    """images [B, C, S, S] in [0, 1] -> their mean-grey thumbnails (side <= THUMBNAIL_SIDE), flattened [B, F]."""
    side = _largest_divisor(images.shape[-1], THUMBNAIL_SIDE)
    return F.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), side).flatten(1)


def pool_bank_maps(maps: Tensor) -> Tensor:
    """Component maps [N, K, S, S] -> the bank's copy [N, K, S / f, S / f], f the largest divisor of S <= 4."""
    return F.avg_pool2d(maps, _largest_divisor(maps.shape[-1], BANK_POOL))


def neighbour_reference(features: Tensor, bank_features: Tensor, bank_maps: Tensor, k: int, size: int) -> Tensor:
    """Reference maps [B, K, size, size] (> 0) for images with thumbnails `features` [B, F]: the mean of the
    pooled maps `bank_maps` [N, K, s, s] of their k nearest bank thumbnails `bank_features` [N, F] (squared
    Euclidean distance, k <= N), plus REFERENCE_FLOOR times its spatial mean, upsampled bilinearly."""
    distances = ((features * features).sum(1, keepdim=True) - 2.0 * features @ bank_features.T
                 + (bank_features * bank_features).sum(1)[None])  # [B, N]
    nearest = torch.topk(distances, k, dim=1, largest=False).indices  # [B, k]
    means = bank_maps[nearest].mean(dim=1)  # [B, K, s, s]
    spatial = means.mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(means.dtype).tiny)
    reference = means + REFERENCE_FLOOR * spatial
    if reference.shape[-1] == size:
        return reference
    return F.interpolate(reference, size=(size, size), mode="bilinear", align_corners=False)
