"""Training the learned scoring head (``anoddpm.model.head``) on synthetic anomalies of good images, the denoiser frozen."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anoddpm.config import Config
from anoddpm.data.anomalies import synthesize_anomalies
from anoddpm.model.head import ScoringHead

FOCAL_GAMMA = 2.0


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
