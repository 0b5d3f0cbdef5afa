"""'feature_residual' (DDAD's comparison): how far the backbone features of the reconstruction are from the input's.

With an adapted backbone (``train.adapt_steps``: a copy of the backbone fine-tuned so that good images and their
reconstructions have the same features, ``anoddpm.training.adaptation``) the component compares the two in that
copy's features; without one, in the frozen backbone's features the Detector extracts once for every component.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.maps import gaussian_blur


def feature_distance(a: Tensor, b: Tensor) -> Tensor:
    """Feature maps [B, C, h, w] of two batches -> per-location 1 - cosine similarity [B, 1, h, w], in [0, 2]."""
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)


def feature_residual_map(seen: list[Tensor], rebuilt: list[Tensor], size: int) -> Tensor:
    """Stage features of inputs and of their reconstructions -> sum over stages of (1 - cosine) [B, 1, size, size]."""
    total = None
    for a, b in zip(seen, rebuilt):
        distance = F.interpolate(feature_distance(a, b), size=(size, size), mode="bilinear", align_corners=False)
        total = distance if total is None else total + distance
    return total


class FeatureResidual(Component):
    """Per location and stage, 1 - cosine similarity of input and reconstruction features, summed and blurred;
    `adapted` (a FeatureExtractor with adapted weights) replaces the shared frozen features when given."""

    name = "feature_residual"

    def __init__(self, sigma: float, adapted: nn.Module | None = None) -> None:
        super().__init__()
        self.sigma = sigma
        self.adapted = adapted
        self.needs_features = adapted is None
        self.needs_rebuilt_features = adapted is None

    def forward(self, work: SharedWork) -> Tensor:
        size = work.images.shape[-1]
        if self.adapted is None:
            seen, rebuilt = work.features, work.rebuilt_features
        else:
            n = work.images.shape[0]
            both = self.adapted(torch.cat([work.images, work.reconstruction]))
            seen, rebuilt = [f[:n] for f in both], [f[n:] for f in both]
        return gaussian_blur(feature_residual_map(seen, rebuilt, size), self.sigma)
