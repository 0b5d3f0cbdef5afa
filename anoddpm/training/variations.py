"""More good images from a few: diffusion-made variations (Diffusion Inversion, Zhou et al. 2023) and the geometric
transforms that suit the product.

A variation noises a shot to a moderate depth (the deepest noise level the denoiser was trained on,
``diffusion.t_max_fraction`` of T) with a seeded draw and denoises it back with a few DDIM steps: the model keeps the
shot's layout and redraws its fine detail, a plausible other good part. Variations made with a base model before
fine-tuning are the base model's own samples of the prior-preservation loss (DreamBooth); variations made with the
fine-tuned model enlarge the shots for the feature memory, the references and the leave-one-out calibration.

Geometric transforms: a flip or quarter turn is used only when it changes the shots no more than they differ from
each other (grey-thumbnail distance, within 10 %): textures, whose good parts differ from each other everywhere, take them;
aligned objects, whose flipped or turned view is further from the shots than they are from each other, do not.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from anoddpm.config import Config
from anoddpm.detection.fewshot import calibrate_shots
from anoddpm.detection.references import thumbnail_features
from anoddpm.model.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.model.intensity import denormalise, intensity_stats, normalise
from noise import make_noise

log = logging.getLogger(__name__)
VARIATION_STEPS = 5  # DDIM steps back from the variation depth
# a transform suits the product when it moves the shots at most this factor of their mutual distance: measured
# (8 shots, 128 px) magnetic_tile flips 0.62, rot180 0.72, quarter turns 1.15; juice_bottle hflip 0.88, others >= 1.47;
# i.i.d. noise textures 0.97-1.04
SUIT_TOLERANCE = 1.1
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # [C, H, W] -> [C, H', W']
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1, :],
    "rot180": lambda a: a[:, ::-1, ::-1],
    "rot90": lambda a: np.rot90(a, 1, axes=(1, 2)),
    "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)),
    "transpose": lambda a: a.transpose(0, 2, 1),
}


def variation_depth(cfg: Config) -> int:
    """Depth of a variation: the deepest training noise level, ``diffusion.t_max_fraction`` * T (>= 1)."""
    return max(1, int(cfg.diffusion.t_max_fraction * cfg.diffusion.timesteps))


@torch.no_grad()
def diffusion_variations(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, images: Sequence[np.ndarray],
                         per_image: int, seed: int, device: torch.device) -> list[list[np.ndarray]]:
    """`per_image` variations of each image ([C, S, S] float32 in [0, 1]) -> list per image of [C, S, S] float32 in
    [0, 1]; variation j of image i is a pure function of (weights, image, seed, i, j)."""
    if per_image < 1 or not len(images):
        return [[] for _ in images]
    d, depth = cfg.diffusion, variation_depth(cfg)
    model = model.eval()
    out: list[list[np.ndarray]] = []
    for i, image in enumerate(images):
        x = torch.as_tensor(np.asarray(image, np.float32), device=device)[None].expand(per_image, -1, -1, -1)
        stats = None if cfg.data.intensity == "none" else intensity_stats(x, cfg.data.intensity)
        x_start = (x if stats is None else normalise(x, stats)) * 2 - 1
        generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        t = torch.full((per_image,), float(depth - 1), device=device)
        noise = make_noise(cfg.detect.noise, tuple(x_start.shape), t=t, generator=generator, device=device,
                           octaves=d.octaves, persistence=d.persistence, frequency=d.frequency,
                           standardise=d.standardise)
        recon = (partial_diffusion_reconstruct(model, diffusion, x_start, depth, min(VARIATION_STEPS, depth), "ddim",
                                               noise).clamp(-1, 1) + 1) / 2
        recon = recon if stats is None else denormalise(recon, stats).clamp(0, 1)
        out.append([v.float().cpu().numpy() for v in recon])
    return out


def suited_transforms(images: Sequence[np.ndarray]) -> list[str]:
    """Names of the TRANSFORMS that move the shots ([C, S, S] in [0, 1]) no further than the shots are from each
    other (within SUIT_TOLERANCE), by mean grey-thumbnail distance; none for a single shot or non-square images."""
    if len(images) < 2 or any(a.shape[1] != a.shape[2] for a in images):
        return []
    stack = np.stack([np.asarray(a, np.float32) for a in images])
    thumbs = thumbnail_features(torch.from_numpy(stack))
    spread = torch.pdist(thumbs).mean()
    kept = []
    for name, fn in TRANSFORMS.items():
        moved = thumbnail_features(torch.from_numpy(np.ascontiguousarray(np.stack([fn(a) for a in stack]))))
        if (moved - thumbs).norm(dim=1).mean() <= SUIT_TOLERANCE * spread:
            kept.append(name)
    return kept


def transformed(image: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """`image` [C, S, S] under each named transform (contiguous float32 copies)."""
    return [np.ascontiguousarray(TRANSFORMS[n](image), dtype=np.float32) for n in names]


def derived_images(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, shots: Sequence[np.ndarray],
                   per_image: int, seed: int, device: torch.device) -> tuple[list[list[np.ndarray]], list[str]]:
    """For each shot: its diffusion variations and its suited geometric transforms -> (list per shot, the transform
    names used)."""
    names = suited_transforms(shots)
    variations = diffusion_variations(model, diffusion, cfg, shots, per_image, seed, device)
    return [v + transformed(np.asarray(s, np.float32), names) for s, v in zip(shots, variations)], names


def calibrate_k_shot(bundle: Path, cfg: Config, model: nn.Module, diffusion: GaussianDiffusion,
                     shots: Sequence[np.ndarray], device: torch.device) -> dict:
    """The end of a K-shot `train`: derived images when ``data.augment`` is diffusion (made by the trained EMA
    `model`), then the leave-one-out calibration (``detection.fewshot.calibrate_shots``) -> the threshold dict."""
    derived = None
    if cfg.data.augment == "diffusion":
        derived, names = derived_images(model, diffusion, cfg, shots, cfg.data.variations, cfg.train.seed, device)
        log.info("augment diffusion: %d variation(s) per shot and the transforms %s", cfg.data.variations,
                 ", ".join(names) or "none (they do not suit the product)")
    return calibrate_shots(bundle, shots, device, derived=derived)
