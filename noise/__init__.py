"""Simplex and Gaussian noise for AnoDDPM: exact OpenSimplex in torch plus batched fractal noise.

Fractal noise runs in numba kernels on the CPU (`noise.cpu`; ANODDPM_NOISE_NUMBA=0 forces torch) and in
eager torch on any other device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noise.fractal import NOISE_KINDS, make_noise, simplex_noise
from noise.simplex import Tables, noise2, noise3, tables_for_seed

__all__ = ["NOISE_KINDS", "make_noise", "simplex2", "simplex3", "simplex_noise"]

_TABLES: dict[tuple[int, torch.device], Tables] = {}


def _tables(seed: int, device: torch.device) -> Tables:
    key = (int(seed), device)
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = tables_for_seed(seed, device, torch.float64)
    return _TABLES[key]


def _result_dtype(*coords: Tensor) -> torch.dtype:
    dtype = coords[0].dtype
    for c in coords[1:]:
        dtype = torch.promote_types(dtype, c.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def simplex2(x: Tensor, y: Tensor, seed: int) -> Tensor:
    """OpenSimplex 2-D noise in [-1, 1] at broadcast(x, y), equal to opensimplex.seed(seed); noise2(x, y).

    Computed in float64 (coordinates up to ~1e4 stay exact), returned in the inputs' float dtype.
    """
    dtype = _result_dtype(x, y)
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    return noise2(x64, y64, _tables(seed, x64.device)).to(dtype)


def simplex3(x: Tensor, y: Tensor, z: Tensor, seed: int) -> Tensor:
    """OpenSimplex 3-D noise in [-1, 1] at broadcast(x, y, z), equal to opensimplex.seed(seed); noise3(x, y, z)."""
    dtype = _result_dtype(x, y, z)
    x64, y64, z64 = x.to(torch.float64), y.to(torch.float64), z.to(torch.float64)
    return noise3(x64, y64, z64, _tables(seed, x64.device)).to(dtype)
