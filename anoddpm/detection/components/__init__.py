"""The component maps a Detector combines, one module each (``detect.scorer`` names them, joined by '+'):

- ``residual``: the plain AnoDDPM residual between input and reconstruction;
- ``head``: the learned scoring head's anomaly probability;
- ``feature_residual``: backbone-feature distance between input and reconstruction (DDAD), in the adapted backbone's
  features when the model has one;
- ``feature_memory``: distance of each patch to the nearest good training patch (PatchCore; owns its bank).

Each is a ``base.Component``: what it needs from the batch's shared work, its map, what it fits from good images and
its state for the bundle. ``build_components`` makes them from a config.
"""
from __future__ import annotations

from torch import nn

from anoddpm.config import Config
from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.components.feature_memory import FeatureMemory
from anoddpm.detection.components.feature_residual import FeatureResidual
from anoddpm.detection.components.head import Head
from anoddpm.detection.components.residual import Residual
from anoddpm.model.head import ScoringHead

__all__ = ["Component", "SharedWork", "build_components"]


def build_components(names: tuple[str, ...], cfg: Config, head: ScoringHead | None,
                     adapted: nn.Module | None = None) -> list[Component]:
    """One Component per name of ``anoddpm.config.COMPONENTS``, in order (`adapted`: the adapted backbone, if any)."""
    det = cfg.detect
    makers = {
        "residual": lambda: Residual(det),
        "head": lambda: Head(head, det.smoothing_sigma),
        "feature_residual": lambda: FeatureResidual(det.smoothing_sigma, adapted),
        "feature_memory": lambda: FeatureMemory(cfg.backbone.pool, det.smoothing_sigma, det.memory_size, det.seed),
    }
    return [makers[name]() for name in names]
