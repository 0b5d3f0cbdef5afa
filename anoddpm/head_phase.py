"""What follows the denoiser's training: the learned scoring head's phase, its check, and the bundle's calibration.

``train`` gives the head the last ``head.budget_fraction`` of the budget when its share reaches ``head.min_steps``
(``head_is_trained``), keeps it only when ``checked_head`` finds the fused map no worse than the residual on
synthetic anomalies, and ends with ``calibrate_bundle`` on the held-back good images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anoddpm.bundle import update_threshold
from anoddpm.config import Config
from anoddpm.diffusion import GaussianDiffusion

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
    from anoddpm.detector import Detector
    from anoddpm.head_check import MIN_CHECK_IMAGES, compare_scorers_on_synthetic, head_earns_its_place

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
    from anoddpm.detector import Detector
    from anoddpm.head import build_head, train_head

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


def calibrate_bundle(bundle_path: str | Path, val_ds: Any, device: torch.device,
                     train_ds: Any = None) -> dict[str, Any]:
    """Score held-back good images with the bundle's Detector and store the threshold (and the map reference
    fitted with it, on train_ds for nearest_good) in the bundle."""
    from anoddpm.bundle import load_bundle
    from anoddpm.detector import Detector
    from anoddpm.evaluate import fitted_reference, score_good_and_fit_reference
    from anoddpm.tiled import inspection_detector
    from eval.threshold import calibrate

    bundle = load_bundle(bundle_path, map_location=device)
    detector = inspection_detector(Detector.from_bundle(bundle, device).eval(), bundle.cfg.train.batch_size)
    scored = score_good_and_fit_reference(detector, val_ds, device, bundle.cfg.train.batch_size, bank_images=train_ds)
    threshold = calibrate(scored.scores, scored.maps, quantile=bundle.cfg.detect.threshold_quantile)
    threshold["detect"] = bundle.cfg.to_dict()["detect"]
    threshold["components"] = list(detector.components)
    update_threshold(bundle_path, threshold, **fitted_reference(detector))
    log.info("calibrated on %d held-back good images: image threshold %.6g", len(val_ds), threshold["image"])
    return threshold
