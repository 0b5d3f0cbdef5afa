"""'residual': the plain AnoDDPM map, the blurred residual between the input and its reconstruction."""
from __future__ import annotations

from torch import Tensor

from anoddpm.config import DetectConfig
from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.maps import anomaly_map
from anoddpm.model.intensity import normalise


class Residual(Component):
    """The residual map (``detect.residual``, ``residual_norm``, ``smoothing_sigma``) in the units the model
    worked in (per-image intensity normalised when ``data.intensity`` is 'per_image')."""

    name = "residual"

    def __init__(self, detect: DetectConfig) -> None:
        super().__init__()
        self.residual, self.sigma, self.norm = detect.residual, detect.smoothing_sigma, detect.residual_norm

    def forward(self, work: SharedWork) -> Tensor:
        seen, rebuilt = work.images, work.reconstruction
        if work.stats is not None:
            seen, rebuilt = normalise(seen, work.stats), normalise(rebuilt, work.stats)
        return anomaly_map(seen, rebuilt, self.residual, self.sigma, self.norm)
