"""Map references (``detect.map_reference``): each referenced component map divided per pixel by what good images show
there, so borders, glare and label edges stop deciding the score. ``MapReference`` owns the fitted state; the
functions below run inside the exported ONNX graph.

'good_mean': one reference map [1, K, S, S] fitted on good images (``eval.threshold.reference_map``), stored in the
bundle as ``map_reference``. 'nearest_good': one mean map of good images cannot serve good images that differ in
layout or exposure: on
magnetic_tile the highest-scoring good images were whole-tile views, whose arched tile edges most training
images do not show. Here each image's reference is the mean component map of the k training images
nearest to it in a coarse grey thumbnail, plus ``REFERENCE_FLOOR`` times that mean's spatial mean, as in
``eval.threshold.reference_map``. The bank (thumbnails and pooled maps of the training images) is fitted at
calibration and stored in the bundle; the search runs inside the exported ONNX graph (MatMul, TopK, Gather).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from eval.threshold import REFERENCE_FLOOR, reference_map

THUMBNAIL_SIDE = 16  # side of the grey thumbnail images are compared by, pixels (a divisor of the image side)
BANK_POOL = 4  # the bank keeps component maps average-pooled by this factor (the maps are blurred, sigma 4)


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


class MapReference(nn.Module):
    """The fitted reference of ``detect.map_reference`` for K component maps of side S; `referenced` [K] says which
    maps it divides (a feature_memory map keeps its units). forward(components, images) -> referenced components.

    State: 'good_mean' a map [1, K, S, S] (``fit_good_mean``); 'nearest_good' a bank of good-image thumbnails [N, F]
    and their pooled component maps [N, K, s, s] (``fit_nearest_good``). Unfitted, maps pass unchanged."""

    map_reference: Tensor
    bank_features: Tensor
    bank_maps: Tensor
    referenced: Tensor

    def __init__(self, mode: str, neighbours: int, names: tuple[str, ...], referenced: list[bool], side: int) -> None:
        super().__init__()
        self.mode, self.neighbours, self.names, self.side = mode, neighbours, names, side
        self.register_buffer("referenced", torch.tensor(referenced, dtype=torch.bool), persistent=False)
        self.register_buffer("map_reference", torch.ones(1, len(names), side, side), persistent=False)
        self.has_map_reference = False
        self.register_buffer("bank_features", torch.zeros(0), persistent=False)  # [N, F] thumbnails
        self.register_buffer("bank_maps", torch.zeros(0), persistent=False)  # [N, K, s, s] pooled component maps

    @property
    def any_referenced(self) -> bool:
        """False when no component map is divided by a reference (feature_memory alone)."""
        return bool(self.referenced.any())

    @property
    def has_reference_bank(self) -> bool:
        """True when a nearest_good bank is set."""
        return self.bank_features.numel() > 0

    def reset(self) -> None:
        """Forget both fitted references."""
        self.map_reference.fill_(1.0)
        self.has_map_reference = False
        device = self.map_reference.device
        self.bank_features, self.bank_maps = torch.zeros(0, device=device), torch.zeros(0, device=device)

    def fit_good_mean(self, components: np.ndarray) -> None:
        """The good_mean reference from good component maps [N, K, S, S]: each referenced component's
        ``reference_map``, 1 for the others."""
        referenced = self.referenced.tolist()
        self._use_good_mean(torch.from_numpy(np.stack([
            reference_map(components[:, k]) if referenced[k] else np.ones_like(components[0, k])
            for k in range(components.shape[1])])))

    def _use_good_mean(self, reference: Tensor | None) -> None:
        """Use `reference` [K, S, S] or [1, K, S, S] (> 0; [S, S] when K = 1) as the good_mean map; None = none."""
        if reference is None:
            self.map_reference.fill_(1.0)
            self.has_map_reference = False
            return
        shape = self.map_reference.shape
        reference = torch.as_tensor(reference, dtype=self.map_reference.dtype).reshape(-1)
        if reference.numel() != self.map_reference.numel() or not bool((reference > 0).all()):
            raise ValueError(f"map reference must hold {shape[1]} x {shape[2]}x{shape[3]} positive values "
                             f"(one map per component: {', '.join(self.names)}), got {reference.numel()} values")
        self.map_reference.copy_(reference.view(shape))
        self.has_map_reference = True

    def fit_nearest_good(self, features: Tensor | None, maps: Tensor | None = None) -> None:
        """Use the thumbnails `features` [N, F] (``thumbnail_features``) of good training images and their pooled
        component maps `maps` [N, K, s, s] (``pool_bank_maps``, >= 0) as the nearest_good bank; None = no bank."""
        device = self.map_reference.device
        if features is None:
            self.bank_features, self.bank_maps = torch.zeros(0, device=device), torch.zeros(0, device=device)
            return
        features = torch.as_tensor(features, dtype=torch.float32, device=device)
        maps = torch.as_tensor(maps, dtype=torch.float32, device=device)
        n_features = thumbnail_length(self.side)
        k = len(self.names)
        n = features.shape[0] if features.ndim == 2 else -1
        if (n < 1 or features.shape[1] != n_features or maps.ndim != 4 or maps.shape[:2] != (n, k)
                or self.side % maps.shape[-1] or maps.shape[-1] != maps.shape[-2]):
            raise ValueError(f"reference bank must hold N x {n_features} thumbnails and N x {k} x s x s maps "
                             f"(one per component: {', '.join(self.names)}), got {tuple(features.shape)} and "
                             f"{tuple(maps.shape)}")
        if not bool((maps >= 0).all()) or not bool(torch.isfinite(features).all()):
            raise ValueError("reference bank maps must be >= 0 and its thumbnails finite")
        self.bank_features, self.bank_maps = features, maps

    def forward(self, components: Tensor, images: Tensor) -> Tensor:
        """Component maps [B, K, S, S] of images [B, C, S, S] -> each referenced map over its reference."""
        reference = None
        if self.has_map_reference and self.mode == "good_mean":
            reference = self.map_reference
        elif self.has_reference_bank and self.mode == "nearest_good":
            k = min(self.neighbours, self.bank_features.shape[0])
            reference = neighbour_reference(thumbnail_features(images), self.bank_features, self.bank_maps, k,
                                            components.shape[-1])
        if reference is not None and not bool(self.referenced.all()):
            reference = torch.where(self.referenced.view(1, -1, 1, 1), reference, torch.ones_like(reference))
        if reference is not None:
            components = components / reference
        return components

    def fitted_state(self) -> dict[str, Any]:
        """{"map_reference": [1, K, S, S] | None, "reference_bank": {"features", "maps"} | None} on the CPU."""
        bank = None
        if self.has_reference_bank:
            bank = {"features": self.bank_features.detach().cpu(), "maps": self.bank_maps.detach().cpu()}
        return {"map_reference": self.map_reference.detach().cpu() if self.has_map_reference else None,
                "reference_bank": bank}

    def load_fitted_state(self, map_reference: Tensor | None, reference_bank: dict[str, Tensor] | None) -> None:
        """Use the references read from a bundle (each None = not fitted)."""
        if map_reference is not None:
            self._use_good_mean(map_reference)
        if reference_bank is not None:
            self.fit_nearest_good(reference_bank["features"], reference_bank["maps"])
