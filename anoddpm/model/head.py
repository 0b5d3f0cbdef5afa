"""Learned scoring head: a small conv UNet that turns (image, reconstruction) into anomaly logits.

Trained after the denoiser, which stays frozen, on good images carrying synthetic anomalies
(`anoddpm.data.anomalies`); the target is the synthetic mask. Only Conv, GroupNorm, ReLU, MaxPool
and Resize ops, so it exports to ONNX with the rest of the detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anoddpm.config import Config

LEVELS = 4


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
