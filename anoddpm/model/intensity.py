"""Per-image intensity normalisation: the model sees every image at the same brightness and contrast.

Lighting changes the scale of a texture's residual: on magnetic_tile the brightest good images had
the highest scores and the darkest defective ones the lowest. With ``data.intensity`` 'per_image'
the detector (and training) maps each image to ``0.5 + (x - mean) / (SPAN * std)`` before noising,
reconstructs there, and measures the residual there; the reconstruction it returns is mapped back.
The transform is affine per image and not clipped, so it is exactly invertible and exports to ONNX.
"""
from __future__ import annotations

from torch import Tensor

from anoddpm.config import INTENSITY_MODES

SPAN = 6.0  # standard deviations mapped onto the unit range: mean -/+ 3 std -> 0 / 1
MIN_STD = 1e-3  # floor of the std, in [0, 1] grey levels (flat images are not blown up)


def intensity_stats(images: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(offset, scale) [B, 1, 1, 1] of images [B, C, H, W] in [0, 1] for mode 'per_image': mean and SPAN * std."""
    if mode != "per_image":
        raise ValueError(f"data.intensity={mode!r} is not allowed; choose one of {', '.join(INTENSITY_MODES)}")
    flat = images.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp_min(MIN_STD).view(-1, 1, 1, 1)
    return mean, SPAN * std


def normalise(images: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """Images [B, C, H, W] in [0, 1] -> the same images centred on 0.5 at unit scale (not clipped)."""
    offset, scale = stats
    return (images - offset) / scale + 0.5


def denormalise(images: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """Inverse of ``normalise`` with the same stats."""
    offset, scale = stats
    return (images - 0.5) * scale + offset


def model_inputs(target: Tensor, seen: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Images [B, C, H, W] in [0, 1] -> (target, seen) in the model's [-1, 1] space, both normalised with
    the stats of ``seen`` (the image the model is shown; target = what it should reconstruct)."""
    if mode == "none":
        return target * 2 - 1, seen * 2 - 1
    stats = intensity_stats(seen, mode)
    return normalise(target, stats) * 2 - 1, normalise(seen, stats) * 2 - 1


def condition_inputs(neighbours: Tensor, channels: int, mode: str) -> Tensor:
    """Conditioning images [B, k * C, H, W] in [0, 1] -> the model's [-1, 1] space, each neighbour normalised with
    its own stats (as the model sees every image)."""
    if mode == "none":
        return neighbours * 2 - 1
    b, kc, h, w = neighbours.shape
    each = neighbours.reshape(b * (kc // channels), channels, h, w)
    return (normalise(each, intensity_stats(each, mode)) * 2 - 1).reshape(b, kc, h, w)
