"""anoddpm: visual anomaly detection with partial diffusion and simplex noise.

``anoddpm.load(path)`` is the Python API (``anoddpm.api``). Importing the package imports no torch, and
loading an exported .onnx does not either: the line runtime (deploy/) shares its image code.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
BUNDLE_FORMAT_VERSION = 1
__all__ = ["Model", "Prediction", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """Lazy access to the API (``load``, ``Model``, ``Prediction``), so ``import anoddpm`` stays light."""
    if name in ("load", "Model", "Prediction"):
        from anoddpm import api

        return getattr(api, name)
    raise AttributeError(f"module 'anoddpm' has no attribute {name!r}")
