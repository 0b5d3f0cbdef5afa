"""Partial-diffusion reconstruction: [0, 1] images -> noised to ``detect.depth`` -> denoised back, deterministically.

Fast path (sampler 'ddim'): the detection noise is a fixed buffer drawn once from ``cfg.detect.seed`` for one image
and shared by every batch item, so an image's reconstruction never depends on the batch it was in; timesteps are
Python constants, so it traces to ONNX. With ``detect.samples > 1`` the reconstructions are averaged.

Input guidance (``detect.guidance`` W > 0, DDAD): every step's noise estimate is pulled toward the input noised to the
same level, so the reconstruction keeps the input's normal detail while still repairing what the model never saw.

Retrieval conditioning (``model.condition`` 'retrieval'): the caller passes the retrieved neighbours, and every
denoising step of the UNet sees them (``anoddpm.detection.retrieval``).

Paper path (sampler 'ancestral'): ``depth`` DDPM steps with fresh noise per step from a generator re-seeded with
``cfg.detect.seed`` at every call, each draw made for one image and shared by the batch (as on the fast path).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from anoddpm.config import Config
from anoddpm.model.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.model.intensity import denormalise, intensity_stats, normalise
from anoddpm.model.unet import UNet, bind_condition
from noise import make_noise


class Reconstructor(nn.Module):
    """UNet + diffusion schedule + cfg.detect: forward(images, stats) -> reconstruction [B, C, S, S] in [0, 1]."""

    detection_noise: Tensor

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, cfg: Config) -> None:
        super().__init__()
        self.cfg, self.unet, self.diffusion = cfg, unet, diffusion
        d = cfg.data
        shape = (cfg.detect.samples, d.channels, d.input_side, d.input_side)
        generator = torch.Generator().manual_seed(cfg.detect.seed)
        t = torch.full((shape[0],), float(cfg.detect.depth - 1))
        self.register_buffer("detection_noise", self._noise(shape, t, generator, torch.device("cpu")), persistent=False)

    def _noise(self, shape: tuple[int, ...], t: Tensor, generator: torch.Generator, device: torch.device) -> Tensor:
        diff = self.cfg.diffusion
        return make_noise(
            self.cfg.detect.noise, shape, t=t, generator=generator, device=device, octaves=diff.octaves,
            persistence=diff.persistence, frequency=diff.frequency, standardise=diff.standardise,
        )

    def intensity_stats(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per-image (offset, scale) [B, 1, 1, 1] of ``data.intensity`` 'per_image'; None for 'none'."""
        mode = self.cfg.data.intensity
        return None if mode == "none" else intensity_stats(images, mode)

    def forward(self, images: Tensor, stats: tuple[Tensor, Tensor] | None, condition: Tensor | None = None) -> Tensor:
        """Reconstruction [B, C, S, S] in [0, 1] of images [B, C, S, S] in [0, 1] (normalised by `stats` for the
        model), averaged over detect.samples; `condition` [B, k * C, S, S] in [0, 1]: the retrieved neighbours of a
        conditioned UNet."""
        det = self.cfg.detect
        x_start = (images if stats is None else normalise(images, stats)) * 2.0 - 1.0
        model = bind_condition(self.unet, condition, self.cfg)
        generator = None
        if det.sampler == "ancestral":
            generator = torch.Generator(device=images.device).manual_seed(det.seed)
        total = torch.zeros_like(x_start)
        for s in range(det.samples):
            if det.sampler == "ddim":
                noise = self.detection_noise[s : s + 1].expand_as(x_start)
                step_noise = None
            else:
                noise = self._step_noise(x_start, det.depth - 1, generator)
                step_noise = functools.partial(self._step_noise, x_start, generator=generator)
            total = total + partial_diffusion_reconstruct(
                model, self.diffusion, x_start, det.depth, det.steps, det.sampler, noise, step_noise, det.guidance
            )
        reconstruction = (total / det.samples + 1.0) / 2.0
        return (reconstruction if stats is None else denormalise(reconstruction, stats)).clamp(0.0, 1.0)

    def _step_noise(self, x: Tensor, t: int, generator: torch.Generator) -> Tensor:
        """Noise drawn for one image and shared by the batch, so no image's score depends on its batch."""
        one = (1, *x.shape[1:])
        return self._noise(one, torch.full((1,), float(t)), generator, x.device).to(x.dtype).expand_as(x)
