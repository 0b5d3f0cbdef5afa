"""'head': the learned scoring head's anomaly probability (``anoddpm.model.head``), blurred like the residual."""
from __future__ import annotations

from torch import Tensor

from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.maps import gaussian_blur
from anoddpm.model.head import ScoringHead


class Head(Component):
    """The head's map of (image, reconstruction), smoothed with ``detect.smoothing_sigma``."""

    name = "head"

    def __init__(self, head: ScoringHead, sigma: float) -> None:
        super().__init__()
        self.head, self.sigma = head, sigma

    def forward(self, work: SharedWork) -> Tensor:
        return gaussian_blur(self.head.anomaly_map(work.images, work.reconstruction), self.sigma)
