"""The backbone adapted to the model's reconstructions (DDAD's domain adaptation, ``train.adapt_steps``).

A frozen ImageNet backbone sees a reconstruction as a slightly different image from its input even where the part is
good (the denoiser smooths fine texture), so ``feature_residual`` is high on good regions. After the denoiser (and
the head) ``train`` fine-tunes a copy of the backbone on the training images and their own reconstructions (the
bundle's detection settings, computed once): at every location of every stage of ``backbone.layers`` the copy's
features of an image and of its reconstruction are pulled together (1 - cosine, the distance ``feature_residual``
measures), while ``train.adapt_lambda`` times the same distance to the frozen backbone's features of each keeps the
copy near the pretrained network, so it cannot collapse to features that ignore the image. Batch-norm statistics
stay the pretrained ones (the extractor never leaves eval mode). The copy's weights go into the bundle
(``adapted_backbone``) and the ONNX graph; ``feature_memory`` keeps the frozen backbone.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from anoddpm.config import Config
from anoddpm.data.datasets import ImageDataset
from anoddpm.detection.backbone import build_backbone
from anoddpm.detection.components.feature_residual import feature_distance
from anoddpm.detection.detector import Detector
from anoddpm.detection.tiling import as_tiles
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.platform.progress import progress

log = logging.getLogger(__name__)
ADAPT_LR = 1e-4  # Adam learning rate of the adapted copy (DDAD's)


def location_distance(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Stage features [B, C_i, h_i, w_i] of two batches -> mean over locations and stages of feature_residual's
    distance (1 - cosine), scalar."""
    return sum(feature_distance(x, y).mean() for x, y in zip(a, b)) / len(a)


def adaptation_loss(adapted_seen: list[Tensor], adapted_rebuilt: list[Tensor], frozen_seen: list[Tensor],
                    frozen_rebuilt: list[Tensor], keep: float) -> Tensor:
    """Pull the adapted features of images and reconstructions together; `keep` x their distance to the frozen ones."""
    return (location_distance(adapted_seen, adapted_rebuilt)
            + keep * (location_distance(adapted_seen, frozen_seen) + location_distance(adapted_rebuilt, frozen_rebuilt)))


@torch.no_grad()
def reconstruct_all(cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, images: Tensor,
                    device: torch.device) -> Tensor:
    """Reconstructions [N, C, S, S] in [0, 1] (CPU) of images [N, C, S, S] in [0, 1] with cfg.detect's settings."""
    detector = Detector(ema, diffusion, cfg.override("detect", scorer="residual")).to(device).eval()
    size = cfg.train.batch_size
    return torch.cat([detector.reconstruct(images[i:i + size].to(device)).cpu() for i in range(0, len(images), size)])


def training_images(cfg: Config, train_ds: Any) -> Tensor:
    """The training images as the Detector sees them (tiles when data.tile_size), unaugmented: [N, C, S, S]."""
    plain = ImageDataset(train_ds.arrays, train_ds.names)
    views = as_tiles(plain, cfg)
    return torch.stack([views[i] for i in range(len(views))])


def adapt_backbone(cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, train_ds: Any, device: torch.device,
                   log_fn: Callable[[dict], None] | None = None) -> dict[str, Tensor]:
    """Fine-tune a copy of cfg.backbone for cfg.train.adapt_steps steps on `train_ds` and its reconstructions by
    the frozen EMA denoiser `ema`; returns the copy's weights and (unchanged, pretrained) batch-norm statistics
    (CPU) for the bundle's ``adapted_backbone``: the bundle needs no weights file for it."""
    start = time.perf_counter()
    images = training_images(cfg, train_ds)
    rebuilt = reconstruct_all(cfg, ema, diffusion, images, device)
    frozen = build_backbone(cfg.backbone).to(device)
    adapted = copy.deepcopy(frozen).requires_grad_(True)
    optimiser = torch.optim.Adam(adapted.parameters(), lr=ADAPT_LR)
    generator = torch.Generator().manual_seed(cfg.train.seed + 3)  # independent of how the earlier phases ran
    batch = min(cfg.train.batch_size, len(images))
    losses: list[float] = []
    for step in progress(range(cfg.train.adapt_steps), desc="adapting the backbone", unit="step"):
        pick = torch.randperm(len(images), generator=generator)[:batch]
        seen, again = images[pick].to(device), rebuilt[pick].to(device)
        with torch.no_grad():
            frozen_both = frozen(torch.cat([seen, again]))
        adapted_both = adapted(torch.cat([seen, again]))
        loss = adaptation_loss([f[:batch] for f in adapted_both], [f[batch:] for f in adapted_both],
                               [f[:batch] for f in frozen_both], [f[batch:] for f in frozen_both],
                               cfg.train.adapt_lambda)
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            raise ValueError(f"backbone adaptation diverged at step {step + 1} (loss {losses[-1]}); lower "
                             "train.adapt_steps or train.adapt_lambda, or train without --adapt-steps")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    minutes = (time.perf_counter() - start) / 60
    last = sum(losses[-20:]) / max(1, len(losses[-20:]))
    log.info("adapted backbone: %d steps on %d images in %.1f min, loss %.4f", len(losses), len(images), minutes, last)
    if log_fn is not None:
        log_fn({"adapt_steps": len(losses), "adapt_minutes": round(minutes, 2), "adapt_loss": last})
    return adapted.adapted_state()
