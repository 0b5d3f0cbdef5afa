"""One rank's optimisation state of the denoiser and its training step: model, EMA copy, AdamW, warm-up
schedule, AMP scaler (CUDA only) and the noise generator every draw of a step comes from, so a resumed
run repeats an uninterrupted one exactly."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from anoddpm.data.anomalies import synthesize_anomalies
from anoddpm.training.checkpointing import set_rng_state
from anoddpm.config import Config
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.intensity import model_inputs
from anoddpm.model.unet import bind_condition, build_unet


def healing_loss(model: nn.Module, diffusion: GaussianDiffusion, x_clean: Tensor, x_input: Tensor, t: Tensor,
                 noise: Tensor, loss: str = "l2", snr_cap: float = 5.0) -> Tensor:
    """eps loss of x_t = q_sample(x_input, t, noise) against the eps that leads back to x_clean; scalar.

    x_clean, x_input, noise [B, C, H, W] in [-1, 1], t [B] long. Samples whose input differs from
    the clean image are weighted min(1, snr_cap / SNR_t) (min-SNR weighting): their eps target
    grows like sqrt(SNR_t) * (x_input - x_clean), which would otherwise swamp the loss at small t.
    """
    x_t = diffusion.q_sample(x_input, t, noise)
    abar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
    target = (x_t - abar.sqrt() * x_clean) / (1 - abar).sqrt()
    eps = model(x_t, t.float())
    err = (eps - target) ** 2 if loss == "l2" else (eps - target).abs()
    healed = (x_input != x_clean).flatten(1).any(dim=1)
    snr = abar.view(-1) / (1 - abar.view(-1))
    weight = torch.where(healed, (snr_cap / snr).clamp(max=1.0), torch.ones_like(snr))
    return (err.mean(dim=(1, 2, 3)) * weight).mean()


class DenoiserOptimiser:
    """The denoiser of one rank and everything its steps change; `net` is what the loss runs through
    (the model itself, or its DistributedDataParallel wrapper under DDP)."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int) -> None:
        tc, dc = cfg.train, cfg.diffusion
        self.cfg = cfg
        self.model = build_unet(cfg).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = GaussianDiffusion.from_config(dc).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
        self.noise_gen = torch.Generator(device=device).manual_seed((tc.seed + 1) * 1_000_003 + rank)
        self.device = device
        self.net: nn.Module = self.model
        if world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.t_max = max(1, int(dc.t_max_fraction * dc.timesteps))
        self.t_min = min(int(dc.t_min_fraction * dc.timesteps), self.t_max - 1)  # both fractions may round to one t

    def start_from(self, weights: dict[str, Tensor]) -> None:
        """Start the weights and their EMA from another model's (`--init`); the optimizer starts afresh."""
        self.model.load_state_dict(weights)
        self.ema.load_state_dict(weights)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's model, ema, optimizer, scheduler and scaler entries."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any], rng: dict[str, Any]) -> None:
        """Restore a checkpoint's entries and this rank's RNG state (``checkpointing.rng_state``)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(rng, self.noise_gen, self.device)

    def step(self, images: Tensor, step: int, condition: Tensor | None = None) -> Tensor:
        """One optimizer step on a batch [B, C, H, W] in [0, 1] (`condition` [B, k * C, H, W] in [0, 1]: the
        retrieved neighbours of a conditioned UNet), then the EMA update for the run's `step` (counted after this
        one); returns the detached loss (a scalar on the device)."""
        from noise import make_noise

        tc, dc = self.cfg.train, self.cfg.diffusion
        net = bind_condition(self.net, condition, self.cfg)
        t = torch.randint(self.t_min, self.t_max, (images.shape[0],), generator=self.noise_gen, device=self.device)
        noise = make_noise(dc.noise, tuple(images.shape), t=t, generator=self.noise_gen, device=self.device,
                           octaves=dc.octaves, persistence=dc.persistence, frequency=dc.frequency,
                           standardise=dc.standardise)
        with self.autocast:
            if tc.anomaly_fraction > 0:
                damaged = synthesize_anomalies(images, self.noise_gen, clean_fraction=1 - tc.anomaly_fraction)[0]
                x_start, x_input = model_inputs(images, damaged, self.cfg.data.intensity)
                loss = healing_loss(net, self.diffusion, x_start, x_input, t, noise, dc.loss, tc.heal_snr_cap)
            else:
                x_start = model_inputs(images, images, self.cfg.data.intensity)[0]
                loss = self.diffusion.training_loss(net, x_start, t, noise, dc.loss)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)
        return loss.detach().float()
