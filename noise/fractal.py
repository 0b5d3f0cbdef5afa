"""Fractal (multi-octave) simplex noise for diffusion, batched over independent fields, plus make_noise.

Design: every (sample, channel) pair is an independent field with its own random 256-entry permutation
(drawn on `device` from `generator` via argsort of uniforms), evaluated on the pixel grid at octave o as
noise3(x / f_o, y / f_o, t / f_o) with f_o = frequency / 2**o and amplitude persistence**o, exactly like
AnoDDPM's `rand_3d_fixed_T_octaves` (without `t`: noise2(x / f_o, y / f_o)). On the CPU the numba
kernels of `noise.cpu` compute it (float64, all octaves per pixel row); elsewhere, or without numba, eager
torch does (float32 unless float64 is requested).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from noise import cpu
from noise.simplex import Tables, noise2, noise3

NOISE_KINDS = ("simplex", "gaussian")
_CPU_BLOCK = 32000  # points per CPU pass: intermediates stay in cache and each op stays below torch's
# parallel grain size (32768), so ops run single-threaded and blocks are spread over a thread pool instead:
# no per-op thread barrier, which on a loaded machine costs more than the op itself.


def _default_device(
    device: torch.device | str | None, t: Tensor | None, generator: torch.Generator | None
) -> torch.device:
    """Explicit device, else t's, else the generator's, else CPU."""
    if device is not None:
        return torch.device(device)
    if t is not None:
        return t.device
    return generator.device if generator is not None else torch.device("cpu")


def _octave_sum(
    coords: list[Tensor], tab: Tables, field: Tensor, octaves: int, persistence: float, frequency: float
) -> Tensor:
    """Sum over octaves o of persistence**o * noise(coords / (frequency / 2**o)) for one block of points."""
    total = torch.zeros_like(coords[0])
    amplitude = 1.0
    f = float(frequency)
    for _ in range(octaves):
        scaled = [coord / f for coord in coords]
        value = noise2(*scaled, tab, field) if len(coords) == 2 else noise3(*scaled, tab, field)
        total.add_(value, alpha=amplitude)
        f /= 2
        amplitude *= persistence
    return total


def _run_blocks(fill: Callable[[slice], None], n: int, device: torch.device) -> None:
    """Call fill(slice) over [0, n): one slice on GPUs; CPU blocks over torch.get_num_threads() workers."""
    if device.type != "cpu":
        fill(slice(0, n))
        return
    parts = [slice(start, start + _CPU_BLOCK) for start in range(0, n, _CPU_BLOCK)]
    workers = min(torch.get_num_threads(), len(parts))
    if workers <= 1:
        for part in parts:
            fill(part)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, parts))


def simplex_noise(
    shape: tuple[int, int, int, int],
    t: Tensor | None = None,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    standardise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fractal simplex noise [B, C, H, W]; `t` [B] diffusion timesteps slice 3-D noise (None: 2-D noise).

    `frequency` is the first octave's wavelength in pixels (halved per octave). Each (sample, channel)
    field gets its own permutation drawn from `generator`, so the same generator state gives the same
    noise. With `standardise` each field is shifted/scaled to zero mean and unit variance over H, W.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0, got {frequency}")
    b, c, h, w = (int(s) for s in shape)
    device = _default_device(device, t, generator)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if t is not None and t.shape != (b,):
        raise ValueError(f"t must have shape ({b},) matching the batch, got {tuple(t.shape)}")
    fields = b * c
    perm = torch.argsort(torch.rand(fields, 256, generator=generator, device=device), dim=1)
    tf = None if t is None else t.to(device).repeat_interleave(c)  # [F] timestep of each field
    if device.type == "cpu" and cpu.available():
        out = cpu.fractal_noise(perm, h, w, tf, octaves, persistence, frequency, standardise, dtype)
        if out is not None:
            return out.view(b, c, h, w)
    out = _torch_fractal(perm, h, w, tf, octaves, persistence, frequency, compute)
    if standardise:
        mean = out.mean(dim=(1, 2), keepdim=True)
        std = out.std(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(compute).tiny)
        out = (out - mean) / std
    return out.view(b, c, h, w).to(dtype)


def _torch_fractal(
    perm: Tensor, h: int, w: int, tf: Tensor | None, octaves: int, persistence: float, frequency: float,
    compute: torch.dtype,
) -> Tensor:
    """Fractal noise [F, h, w] in eager torch on perm's device; tf: [F] timesteps or None (2-D)."""
    fields, device = perm.shape[0], perm.device
    tab = Tables(perm, compute, dims=(2,) if tf is None else (3,))
    field = torch.arange(fields, dtype=torch.int32, device=device).view(fields, 1, 1)
    xs = torch.arange(w, dtype=compute, device=device).view(1, 1, w)
    ys = torch.arange(h, dtype=compute, device=device).view(1, h, 1)
    field = field.expand(fields, h, w).reshape(-1)
    coords = [xs, ys] if tf is None else [xs, ys, tf.to(compute).view(fields, 1, 1)]
    coords = [coord.expand(fields, h, w).reshape(-1) for coord in coords]
    out = torch.empty(fields * h * w, dtype=compute, device=device)

    def fill(part: slice) -> None:
        out[part] = _octave_sum([coord[part] for coord in coords], tab, field[part], octaves, persistence, frequency)

    _run_blocks(fill, out.numel(), device)
    return out.view(fields, h, w)


def make_noise(
    kind: str,
    shape: tuple[int, int, int, int],
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    standardise: bool = True,
) -> Tensor:
    """Diffusion noise [B, C, H, W] of `kind` 'simplex' (fractal, see simplex_noise) or 'gaussian' (N(0, 1)).

    Device defaults to t's, else the generator's, else CPU.
    """
    if kind == "gaussian":
        device = _default_device(device, t, generator)
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if kind == "simplex":
        return simplex_noise(shape, t, octaves, persistence, frequency, standardise, generator, device, dtype)
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
