"""A stand-in eps model for tests and benchmarks: its x0 estimate is a Gaussian blur of the rescaled x_t, so it
reconstructs smooth images and heals sharp marks (no training needed)."""
from __future__ import annotations

import torch

from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.detection.maps import gaussian_blur


class BlurDenoiser(torch.nn.Module):
    """eps(x_t, t) whose implied x0 is gaussian_blur(x_t / sqrt(abar_t), sigma) (sigma in pixels)."""

    def __init__(self, diffusion: GaussianDiffusion, sigma: float) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.sigma = sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.diffusion.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        x0 = gaussian_blur(x / a.sqrt(), self.sigma)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
