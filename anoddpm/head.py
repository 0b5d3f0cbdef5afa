"""Learned scoring head: a small conv UNet that turns (image, reconstruction) into anomaly logits.

Trained after the denoiser, which stays frozen, on good images carrying synthetic anomalies
(`anoddpm.anomalies`); the target is the synthetic mask. Only Conv, GroupNorm, ReLU, MaxPool
and Resize ops, so it exports to ONNX with the rest of the detector.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anoddpm.anomalies import synthesize_anomalies
from anoddpm.config import Config

LEVELS = 4
FOCAL_GAMMA = 2.0


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class ScoringHead(nn.Module):
    """4-level conv UNet: (images, reconstructions) [B,C,H,W] in [0,1] -> logits [B,1,H,W]; H, W multiples of 8."""

    def __init__(self, channels: int, base_channels: int = 16) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(LEVELS)]
        self.channels = channels
        self.down = nn.ModuleList()
        cin = 3 * channels
        for width in widths:
            self.down.append(_block(cin, width))
            cin = width
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(LEVELS - 1)))
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """images, reconstructions: [B,C,H,W] in [0,1] -> logits [B,1,H,W]."""
        h = torch.cat((images, reconstructions, (images - reconstructions).abs()), dim=1)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = block(torch.cat((F.interpolate(h, scale_factor=2.0, mode="nearest"), skip), dim=1))
        return self.out(h)

    def anomaly_map(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """Anomaly probability [B,1,H,W] in [0,1] (smooth it as the plain residual map is smoothed)."""
        return torch.sigmoid(self(images, reconstructions))


def build_head(cfg: Config) -> ScoringHead:
    """ScoringHead for cfg.data.channels with cfg.head.base_channels."""
    return ScoringHead(cfg.data.channels, cfg.head.base_channels)


def head_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Focal loss (gamma 2) + soft Dice over the whole batch; logits, masks [B,1,H,W], masks in {0,1}."""
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    p = torch.sigmoid(logits)
    p_true = p * masks + (1 - p) * (1 - masks)
    focal = ((1 - p_true) ** FOCAL_GAMMA * bce).mean()
    dice = 1 - (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)
    return focal + dice


def train_head(head: ScoringHead, reconstruct_fn: Callable[[Tensor], Tensor], train_ds, cfg: Config,
               generator: torch.Generator, max_steps: int, max_minutes: float | None, device: torch.device,
               log_fn: Callable[[dict], None] | None = None) -> dict:
    """Train ``head`` in place on synthetic anomalies of ``train_ds`` good images ([C,S,S] in [0,1]).

    reconstruct_fn: frozen denoiser, [B,C,S,S] in [0,1] -> [B,C,S,S] in [0,1]. Stops after
    ``max_steps`` or ``max_minutes`` (None = no time limit), whichever comes first; the learning rate
    follows a cosine from ``cfg.head.lr`` to 0 over whichever of the two budgets is used up faster,
    so the head ends on small steps whichever budget stops it. Returns {"steps", "minutes", "loss"}
    (loss = mean of the last 20 steps); the head is left in eval mode.
    """
    if len(train_ds) < 2:
        raise ValueError(f"train_head needs at least 2 training images, got {len(train_ds)}")
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be at least 1")
    head.to(device).train()
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.head.lr, weight_decay=1e-4)
    batch = cfg.head.batch_size
    start = time.monotonic()
    recent: list[float] = []
    step = 0
    while step < max_steps and (max_minutes is None or time.monotonic() - start < 60 * max_minutes):
        progress = step / max_steps
        if max_minutes is not None:
            progress = max(progress, (time.monotonic() - start) / (60 * max_minutes))
        lr = cfg.head.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(train_ds), (2 * batch,), generator=generator, device=generator.device).tolist()
        images = torch.stack([train_ds[i] for i in idx]).to(device)
        good, pool = images[:batch], images[batch:]
        anomalous, masks = synthesize_anomalies(good, generator, pool=pool)
        with torch.no_grad():
            recon = reconstruct_fn(anomalous).clamp(0, 1)
        loss = head_loss(head(anomalous, recon), masks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimiser.step()
        step += 1
        recent = (recent + [loss.detach()])[-20:]
        if log_fn is not None and (step % cfg.train.log_every == 0 or step == max_steps):
            minutes = (time.monotonic() - start) / 60
            log_fn({"phase": "head", "step": step, "loss": float(loss.detach()), "lr": lr, "minutes": minutes})
    head.eval()
    loss = float(torch.stack(recent).mean()) if recent else float("nan")  # nan: the time budget was already spent
    return {"steps": step, "minutes": (time.monotonic() - start) / 60, "loss": loss}
