"""What follows the denoiser's training: the learned scoring head's phase and its check.

``train`` gives the head the last ``head.budget_fraction`` of the budget when its share reaches ``head.min_steps``
(``head_is_trained``), keeps it only when ``checked_head`` finds the fused map no worse than the residual on
synthetic anomalies; ``anoddpm.detection.calibration.calibrate_bundle`` then calibrates the bundle.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.head import build_head
from anoddpm.training.head_check import MIN_CHECK_IMAGES, compare_scorers_on_synthetic, head_earns_its_place
from anoddpm.training.head_training import train_head

log = logging.getLogger(__name__)


def denoiser_steps_before_head(cfg: Config) -> int:
    """The denoiser's share of train.max_steps when a head follows it (the head gets the rest)."""
    return max(1, round(cfg.train.max_steps * (1 - cfg.head.budget_fraction)))


def head_is_trained(cfg: Config) -> bool:
    """Whether training ends with a scoring head: head.enabled and its share of max_steps >= head.min_steps."""
    return cfg.head.enabled and cfg.train.max_steps - denoiser_steps_before_head(cfg) >= cfg.head.min_steps


def checked_head(cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, head: nn.Module,
                  val_ds: Any, device: torch.device, log_fn: Any) -> dict[str, Tensor] | None:
    """The head's weights if the fused map beats the residual on held-back synthetic anomalies (or the
    scorer names the head explicitly, or there are too few held-back images to check); else None."""
    if len(val_ds) < MIN_CHECK_IMAGES:
        log.warning("scoring head: kept unchecked, %d held-back good images are fewer than %d", len(val_ds),
                    MIN_CHECK_IMAGES)
        return head.state_dict()
    detector = Detector(ema, diffusion, cfg.override("detect", scorer="fused"), head).to(device).eval()
    check = compare_scorers_on_synthetic(detector, val_ds, device, cfg.train.batch_size)
    kept = head_earns_its_place(check) or cfg.detect.scorer in ("head", "fused")
    log_fn({"head_check": check, "head_kept": kept})
    figures = ", ".join(f"{name} image / pixel AUROC {check[name]['image_auroc']:.3f} / "
                        f"{check[name]['pixel_auroc']:.3f}" for name in ("fused", "residual"))
    verdict = "kept" if kept else "dropped, the bundle scores with the residual"
    log.info("scoring head: %s (%d synthetic anomalies on %d held-back good images: %s)", verdict,
             check["n_anomalous"], check["n_good"], figures)
    return head.state_dict() if kept else None


def train_head_phase(cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, train_ds: Any, device: torch.device,
                      max_steps: int, max_minutes: float | None, log_fn: Any) -> nn.Module:
    """Train the scoring head on the frozen EMA denoiser's reconstructions; returns it (eval mode)."""
    detector = Detector(ema, diffusion, cfg.override("detect", scorer="residual")).to(device).eval()
    torch.manual_seed(cfg.train.seed + 2)  # head init independent of how the denoiser phase ran
    head = build_head(cfg)
    if getattr(train_ds, "transform", None) is not None:
        train_ds.transform.set_random_seed(cfg.train.seed + 2)
    generator = torch.Generator(device=device).manual_seed((cfg.train.seed + 2) * 1_000_003)
    summary = train_head(head, detector.reconstruct, train_ds, cfg, generator, max(1, max_steps), max_minutes,
                         device, log_fn=log_fn)
    log.info("scoring head: %d steps in %.1f min, loss %.4f", summary["steps"], summary["minutes"], summary["loss"])
    return head
