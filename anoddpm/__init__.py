"""anoddpm: visual anomaly detection with partial diffusion and simplex noise.

The flow, one sub-package a step: ``data`` (images, layouts, datasets, generators) -> ``model`` (UNet, diffusion
math, scoring-head network) -> ``training`` (the loop, one step, checkpoints) -> ``bundle`` (model.pt) ->
``detection`` (reconstruct, components, references, fusion, score, calibration, tiling, settings guard) -> ``cli``
(one thin module per verb); ``config`` and ``platform`` (atomic files, devices) serve them all.

``anoddpm.load(path)`` is the Python API (``anoddpm.api``). Importing the package imports no torch, and
loading an exported .onnx does not either: the line runtime (deploy/) shares its image code.
"""
from __future__ import annotations

from typing import Any

from anoddpm.version import BUNDLE_FORMAT_VERSION, __version__

__all__ = ["BUNDLE_FORMAT_VERSION", "Model", "Prediction", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """Lazy access to the API (``load``, ``Model``, ``Prediction``), so ``import anoddpm`` stays light."""
    if name in ("load", "Model", "Prediction"):
        from anoddpm import api

        return getattr(api, name)
    raise AttributeError(f"module 'anoddpm' has no attribute {name!r}")
