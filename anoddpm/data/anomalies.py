"""Synthetic anomalies on good images, the training signal of the learned scoring head.

Distribution of one call (per sample, independently, all drawn from the given generator):

* ``clean_fraction`` (default ``CLEAN_FRACTION`` = 1/2) of the samples are returned unchanged with an all-zero mask.
* The others get exactly one anomaly of one of three shapes:
  - ``blob`` (45 %): a fractal simplex field, zoomed 1-4x, stretched up to 3x along a random
    direction and thresholded at its own quantile, so the marked share of the image is
    log-uniform in ``BLOB_COVERAGE`` (0.1 %-30 %: ~16 px specks at 128 px up to large patches).
  - ``line`` (20 %): a random-walk polyline of 5 segments, 1-3.5 px wide with a jagged edge
    (cracks, scratches, frays).
  - ``uneven`` (35 %): a smooth, large, low-contrast change of brightness and gain
    ``x + s * sign * (gain * x + offset)`` with ``offset`` in 0.03-0.2, ``gain`` in 0-0.3 and a
    soft-edged envelope ``s`` covering 5-45 % of the image (its core): no hard boundary anywhere.
* Blob and line regions are filled, at an opacity uniform in 0.2-1.0, with one of
  (equally likely) a randomly shifted/rotated/rescaled good image (from ``pool`` or the batch
  itself), a simplex noise texture of random mean and contrast, or a blend towards black or white.
* The returned mask is where the image visibly changed: ``max_c |out - in| > VISIBLE``.
  Changes outside the mask therefore never exceed ``VISIBLE`` (the soft rim of "uneven"
  regions), and a sample whose change stayed invisible ends up with an empty mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from noise import make_noise

CLEAN_FRACTION = 0.5
KIND_PROBS = (0.45, 0.20, 0.35)  # blob, line, uneven
BLOB_COVERAGE = (0.001, 0.30)
UNEVEN_COVERAGE = (0.05, 0.45)
OPACITY = (0.2, 1.0)
VISIBLE = 0.02  # grey-level change (images in [0, 1]) below which a pixel counts as unchanged
_SEGMENTS = 5


def synthesize_anomalies(images: Tensor, generator: torch.Generator, pool: Tensor | None = None,
                         clean_fraction: float = CLEAN_FRACTION) -> tuple[Tensor, Tensor]:
    """Good images [B,C,H,W] in [0,1] -> (images with synthetic anomalies [B,C,H,W] in [0,1], masks [B,1,H,W] in {0,1}).

    ``pool`` [N,C,H,W] in [0,1] supplies the "other good image" patches (default: the batch itself).
    ``clean_fraction`` in [0, 1] is the expected share of samples left unchanged (empty mask).
    Deterministic for a given generator state. Random draws happen on the generator's device (keep it
    on the images' device for speed) and are moved to the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction={clean_fraction} must be in [0, 1]")
    if pool is not None and (pool.dim() != 4 or pool.shape[1:] != images.shape[1:]):
        raise ValueError(f"pool must be [N, {', '.join(map(str, images.shape[1:]))}], got {tuple(pool.shape)}")
    b, c, h, w = images.shape
    dev, dt = images.device, images.dtype

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(dev, dt)

    def noise(channels: int, wavelength: float, octaves: int, persistence: float, coarse: int) -> Tensor:
        # Fields are drawn on a grid ``coarse`` times smaller (wavelengths shrink alike) and resized:
        # simplex noise is the costly part, and these fields carry no detail below ``coarse`` px.
        size = (b, channels, max(h // coarse, 2), max(w // coarse, 2))
        field = make_noise("simplex", size, generator=generator, device=generator.device, dtype=dt,
                           octaves=octaves, persistence=persistence, frequency=wavelength / coarse).to(dev)
        return F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)

    u = rand(b)
    clean = rand(b) < clean_fraction
    kind = (u >= KIND_PROBS[0]).long() + (u >= KIND_PROBS[0] + KIND_PROBS[1]).long()  # 0 blob, 1 line, 2 uneven
    blob_field = _warp(noise(1, h / 8, 3, 0.5, 2), rand(b, 5), zoom=(1.0, 4.0), stretch=3.0)
    blob = _top_share(blob_field, _log_uniform(rand(b), *BLOB_COVERAGE))
    line = _polyline_mask(rand(b, 4 + 2 * _SEGMENTS), blob_field, h, w)
    local = torch.where((kind == 0)[:, None, None, None], blob, line)

    fill = _fill(images, pool, rand, noise)
    opacity = OPACITY[0] + (OPACITY[1] - OPACITY[0]) * rand(b, 1, 1, 1)
    local_out = images + opacity * local * (fill - images)

    uneven_out = _uneven(images, noise(1, float(max(h, w)), 2, 0.5, 8), rand(b, 4))
    out = torch.where((kind == 2)[:, None, None, None], uneven_out, local_out)
    out = torch.where(clean[:, None, None, None], images, out).clamp(0.0, 1.0)
    masks = ((out - images).abs().amax(dim=1, keepdim=True) > VISIBLE).to(dt)
    return out, masks


def _log_uniform(u: Tensor, low: float, high: float) -> Tensor:
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _top_share(field: Tensor, share: Tensor) -> Tensor:
    """Mask [B,1,H,W] of the ``share`` [B] largest values of each field [B,1,H,W]."""
    flat = field.flatten(1)
    n = flat.shape[1]
    rank = ((1.0 - share) * (n - 1)).round().long().clamp(0, n - 1)
    threshold = flat.sort(dim=1).values.gather(1, rank[:, None])
    return (flat > threshold).to(field.dtype).view_as(field)


def _warp(field: Tensor, u: Tensor, zoom: tuple[float, float], stretch: float) -> Tensor:
    """Zoom each field [B,1,H,W] into a random window, stretched along a random direction; u: [B, 5] in [0,1]."""
    z = zoom[0] + (zoom[1] - zoom[0]) * u[:, 0]
    s = 1.0 + (stretch - 1.0) * u[:, 1]
    angle = u[:, 2] * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = 1.0 / z, 1.0 / (z * s)
    theta = torch.stack((torch.stack((cos * sx, -sin * sy, (u[:, 3] - 0.5) * (1 - 1 / z)), -1),
                         torch.stack((sin * sx, cos * sy, (u[:, 4] - 0.5) * (1 - 1 / z)), -1)), 1)
    grid = F.affine_grid(theta, list(field.shape), align_corners=False)
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _polyline_mask(u: Tensor, jitter: Tensor, h: int, w: int) -> Tensor:
    """Thin random-walk polyline masks [B,1,H,W]; u: [B, 4 + 2 * segments] in [0,1], jitter: [B,1,H,W] ~N(0,1)."""
    b = u.shape[0]
    size = float(max(h, w))
    start = torch.stack((u[:, 0] * w, u[:, 1] * h), -1)
    heading = u[:, 2] * 2 * math.pi
    width = 1.0 + 2.5 * u[:, 3]
    turns, lengths = (u[:, 4:] - 0.5).chunk(2, dim=1)
    turns = turns * 1.6  # radians per segment, a crack's wander
    lengths = size * (0.1 + 0.24 * lengths)
    angles = heading[:, None] + turns.cumsum(1)
    steps = torch.stack((torch.cos(angles), torch.sin(angles)), -1) * lengths[..., None]
    points = torch.cat((start[:, None], start[:, None] + steps.cumsum(1)), 1)  # [B, S+1, 2]
    a, d = points[:, :-1], points[:, 1:] - points[:, :-1]
    ys, xs = torch.meshgrid(torch.arange(h, device=u.device, dtype=u.dtype) + 0.5,
                            torch.arange(w, device=u.device, dtype=u.dtype) + 0.5, indexing="ij")
    p = torch.stack((xs, ys), -1).view(1, 1, h * w, 2)
    rel = p - a[:, :, None]
    t = ((rel * d[:, :, None]).sum(-1) / (d * d).sum(-1).clamp_min(1e-6)[..., None]).clamp(0, 1)
    dist = (rel - t[..., None] * d[:, :, None]).norm(dim=-1).amin(1).view(b, 1, h, w)
    return (dist < width.view(b, 1, 1, 1) / 2 + 0.5 * jitter.clamp(-1, 1)).to(u.dtype)


def _fill(images: Tensor, pool: Tensor | None, rand, noise) -> Tensor:
    """Per-sample fill content [B,C,H,W] in [0,1]: shifted good image, noise texture, or black/white."""
    b, c = images.shape[:2]
    source = images.roll(1, 0) if pool is None else pool[(rand(b) * pool.shape[0]).long().clamp_max(pool.shape[0] - 1)]
    u = rand(b, 5)
    patch = _warp(source, u, zoom=(0.5, 2.0), stretch=1.0)
    tone = rand(b, 3)
    texture = (0.15 + 0.7 * tone[:, 0, None, None, None]
               + (0.05 + 0.25 * tone[:, 1, None, None, None]) * noise(c, images.shape[-1] / 16, 2, 0.6, 4).clamp(-3, 3)
               ).clamp(0, 1)
    flat = (tone[:, 2] > 0.5).to(images.dtype).view(b, 1, 1, 1).expand_as(images)
    which = (rand(b) * 3).long().view(b, 1, 1, 1)
    return torch.where(which == 0, patch, torch.where(which == 1, texture, flat))


def _uneven(images: Tensor, field: Tensor, u: Tensor) -> Tensor:
    """Large soft low-contrast brightness/gain change; field [B,1,H,W] is a smooth noise field, u [B,4] in [0,1]."""
    b = images.shape[0]
    core = _top_share(field, UNEVEN_COVERAGE[0] + (UNEVEN_COVERAGE[1] - UNEVEN_COVERAGE[0]) * u[:, 0])
    flat = field.flatten(1)
    lo = flat.median(dim=1).values.view(b, 1, 1, 1)
    hi = torch.where(core > 0, field, torch.full_like(field, float("inf"))).amin(dim=(1, 2, 3), keepdim=True)
    ramp = ((field - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    envelope = ramp * ramp * (3 - 2 * ramp)  # smoothstep: 0 at the median, 1 on the core
    sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0).to(images.dtype).view(b, 1, 1, 1)
    offset = (0.03 + 0.17 * u[:, 2]).view(b, 1, 1, 1)
    gain = (0.3 * u[:, 3]).view(b, 1, 1, 1)
    return images + envelope * sign * (gain * images + offset)
