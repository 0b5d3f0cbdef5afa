"""'feature_residual' (DDAD's comparison): how far the backbone features of the reconstruction are from the input's."""
from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.maps import gaussian_blur


def feature_residual_map(seen: list[Tensor], rebuilt: list[Tensor], size: int) -> Tensor:
    """Stage features of inputs and of their reconstructions -> sum over stages of (1 - cosine) [B, 1, size, size]."""
    total = None
    for a, b in zip(seen, rebuilt):
        distance = 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)
        distance = F.interpolate(distance, size=(size, size), mode="bilinear", align_corners=False)
        total = distance if total is None else total + distance
    return total


class FeatureResidual(Component):
    """Per location and stage, 1 - cosine similarity of input and reconstruction features, summed and blurred."""

    name = "feature_residual"
    needs_features = True
    needs_rebuilt_features = True

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, work: SharedWork) -> Tensor:
        size = work.images.shape[-1]
        return gaussian_blur(feature_residual_map(work.features, work.rebuilt_features, size), self.sigma)
