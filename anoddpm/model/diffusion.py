"""Gaussian diffusion (DDPM) with the openai names, and AnoDDPM's partial diffusion.

Images are in [-1, 1] here. Noise is always an argument (``q_sample(x_start, t, noise)``),
never drawn inside the math; the caller owns every generator.

Partial diffusion: ``depth`` is the paper's lambda, the number of forward steps applied, so
the noised image is x_t at the 0-based index t = depth - 1 and the reverse path ends at x0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.config import BETA_SCHEDULES, LOSSES, SAMPLERS, DiffusionConfig

Timestep = int | Tensor  # a Python int (shared by the batch, baked into traced graphs) or [B] long


def make_betas(schedule: str, T: int) -> Tensor:
    """Beta table [T] float64: 'linear' (DDPM, scaled to T) or 'cosine' (improved DDPM)."""
    if T < 1:
        raise ValueError(f"diffusion.timesteps={T} must be at least 1")
    if schedule == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    raise ValueError(f"diffusion.beta_schedule={schedule!r} is not allowed; choose one of {', '.join(BETA_SCHEDULES)}")


class GaussianDiffusion(nn.Module):
    """Schedule tables as (non-persistent, float32) buffers and the per-step math; t indexes 0..T-1."""

    def __init__(self, timesteps: int = 1000, beta_schedule: str = "linear") -> None:
        super().__init__()
        betas = make_betas(beta_schedule, timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # variance at t=0 is 0; log uses the t=1 value there (openai convention, never sampled)
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        self.num_timesteps = timesteps

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        """Built from cfg.diffusion (timesteps, beta_schedule)."""
        return cls(cfg.timesteps, cfg.beta_schedule)

    def _extract(self, table: Tensor, t: Timestep) -> Tensor:
        """table[t] shaped to broadcast against [B, C, H, W]."""
        if isinstance(t, int):
            return table[t]
        return table[t.to(table.device)].view(-1, 1, 1, 1)

    def q_sample(self, x_start: Tensor, t: Timestep, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) noise; x_start, noise [B, C, H, W]."""
        return self._extract(self.sqrt_alphas_cumprod, t) * x_start + self._extract(
            self.sqrt_one_minus_alphas_cumprod, t
        ) * noise

    def predict_xstart(self, x_t: Tensor, t: Timestep, eps: Tensor) -> Tensor:
        """x0 implied by x_t and predicted eps (unclipped), [B, C, H, W]."""
        return self._extract(self.sqrt_recip_alphas_cumprod, t) * x_t - self._extract(
            self.sqrt_recipm1_alphas_cumprod, t
        ) * eps

    def predict_eps(self, x_t: Tensor, t: Timestep, pred_xstart: Tensor) -> Tensor:
        """eps implied by x_t and an x0 estimate, [B, C, H, W]."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t
        )

    def ancestral_step(self, x_t: Tensor, eps: Tensor, t: int, noise: Tensor | None) -> Tensor:
        """One DDPM step x_t -> x_{t-1}: posterior mean from clipped x0 plus sigma_t * noise (none at t=0)."""
        pred_xstart = self.predict_xstart(x_t, t, eps).clamp(-1.0, 1.0)
        mean = self.posterior_mean_coef1[t] * pred_xstart + self.posterior_mean_coef2[t] * x_t
        if t == 0:
            return mean
        if noise is None:
            raise ValueError("ancestral_step needs noise for t > 0")
        return mean + torch.exp(0.5 * self.posterior_log_variance_clipped[t]) * noise

    def guided_eps(self, x_t: Tensor, eps: Tensor, t: int, x_input: Tensor, weight: float) -> Tensor:
        """eps corrected toward the input (DDAD's conditioning): the input noised to level t with the predicted noise,
        y_t = sqrt(a_t) x_input + sqrt(1 - a_t) eps, pulls eps by weight * sqrt(1 - a_t) * (y_t - x_t); weight 0 = eps."""
        s = self.sqrt_one_minus_alphas_cumprod[t]
        y_t = self.sqrt_alphas_cumprod[t] * x_input + s * eps
        return eps - (weight * s) * (y_t - x_t)

    def ddim_step(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        """Deterministic DDIM step (eta=0) from t to t_prev < t; t_prev=-1 returns the clipped x0."""
        pred_xstart = self.predict_xstart(x_t, t, eps).clamp(-1.0, 1.0)
        if t_prev < 0:
            return pred_xstart
        eps = self.predict_eps(x_t, t, pred_xstart)
        return self.sqrt_alphas_cumprod[t_prev] * pred_xstart + self.sqrt_one_minus_alphas_cumprod[t_prev] * eps

    def training_loss(
        self, model: nn.Module, x_start: Tensor, t: Tensor, noise: Tensor, loss: str = "l2"
    ) -> Tensor:
        """Mean eps-prediction loss (scalar); x_start, noise [B, C, H, W] in [-1, 1], t [B] long."""
        if loss not in LOSSES:
            raise ValueError(f"diffusion.loss={loss!r} is not allowed; choose one of {', '.join(LOSSES)}")
        eps = model(self.q_sample(x_start, t, noise), t.float())
        return F.mse_loss(eps, noise) if loss == "l2" else F.l1_loss(eps, noise)


def timesteps(depth: int, steps: int) -> list[int]:
    """`steps` descending model timesteps for a reverse pass from t=depth-1, evenly spaced by depth/steps.

    depth is the paper's lambda (forward steps applied, 1-based); after the last listed timestep
    the sampler jumps to x0. steps == depth gives every timestep depth-1, ..., 0.
    """
    if depth < 1:
        raise ValueError(f"detect.depth={depth} must be at least 1")
    if not 1 <= steps <= depth:
        raise ValueError(f"detect.steps={steps} must be in 1..detect.depth ({depth})")
    return [(depth * (i + 1) + steps // 2) // steps - 1 for i in reversed(range(steps))]


def partial_diffusion_reconstruct(
    model: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    depth: int,
    steps: int,
    sampler: str,
    noise: Tensor,
    step_noise: Callable[[int], Tensor] | None = None,
    guidance: float = 0.0,
) -> Tensor:
    """Noise x_start [B, C, H, W] in [-1, 1] to t=depth-1 with `noise`, denoise back -> x0 [B, C, H, W] in [-1, 1].

    sampler 'ddim': `steps` deterministic strided steps (see `timesteps`). sampler 'ancestral':
    the paper's path, `depth` DDPM steps (``steps`` is ignored), step t>0 adding ``step_noise(t)``.
    guidance > 0: every step's eps is corrected toward x_start with that weight (``GaussianDiffusion.guided_eps``).
    """
    if not 1 <= depth <= diffusion.num_timesteps:
        raise ValueError(f"detect.depth={depth} must be in 1..{diffusion.num_timesteps}")
    x = diffusion.q_sample(x_start, depth - 1, noise)
    if sampler == "ddim":
        ts = timesteps(depth, steps)
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            eps = model(x, x.new_full((x.shape[0],), float(t)))
            if guidance:
                eps = diffusion.guided_eps(x, eps, t, x_start, guidance)
            x = diffusion.ddim_step(x, eps, t, t_prev)
        return x
    if sampler == "ancestral":
        if step_noise is None:
            raise ValueError("sampler='ancestral' needs step_noise(t) -> Tensor")
        for t in range(depth - 1, -1, -1):
            eps = model(x, x.new_full((x.shape[0],), float(t)))
            if guidance:
                eps = diffusion.guided_eps(x, eps, t, x_start, guidance)
            x = diffusion.ancestral_step(x, eps, t, step_noise(t) if t > 0 else None)
        return x
    raise ValueError(f"detect.sampler={sampler!r} is not allowed; choose one of {', '.join(SAMPLERS)}")
