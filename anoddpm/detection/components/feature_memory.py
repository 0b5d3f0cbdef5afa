"""'feature_memory' (PatchCore): the distance of each patch of the input to its nearest good training patch.

The bank of good patch descriptors is the component's fitted state: a greedy coreset of the training split's patch
features (``fit``), stored in the bundle as ``feature_memory`` and in the ONNX graph. A feature_memory map is already a
distance to good parts, so map references do not apply to it (its training-split maps, which fit the nearest_good bank,
would be 0: the training patches are the memory). It needs no reconstruction.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.detection.components.base import Component, SharedWork
from anoddpm.detection.maps import gaussian_blur
from anoddpm.detection.scoring_loop import batched
from anoddpm.platform.progress import progress

CORESET_CANDIDATES = 40_000  # patch descriptors the greedy coreset picks from (a random subset beyond that)
MEMORY_CHUNK = 4096  # bank rows compared at once: bounds the [locations, bank] distance matrix


def patch_features(stages: list[Tensor], pool: int) -> Tensor:
    """Stage feature maps [B, C_i, h_i, w_i] (first = finest) -> patch descriptors [B, sum C_i, h_0, w_0]."""
    size = stages[0].shape[-2:]
    pooled = []
    for x in stages:
        if pool > 1:
            x = F.avg_pool2d(x, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        pooled.append(x)
    return torch.cat(pooled, dim=1)


def memory_distance_map(features: Tensor, bank: Tensor, size: int) -> Tensor:
    """Descriptors [B, D, h, w] and a bank [M, D] -> distance to the nearest bank row [B, 1, size, size] (>= 0)."""
    b, d, h, w = features.shape
    queries = features.permute(0, 2, 3, 1).reshape(-1, d)
    nearest, index = None, None
    for start in range(0, bank.shape[0], MEMORY_CHUNK):
        rows = bank[start : start + MEMORY_CHUNK]
        squared = (rows * rows).sum(1)[None] - 2.0 * queries @ rows.T
        chunk, chunk_index = squared.min(dim=1)
        chunk_index = chunk_index + start
        if nearest is None:
            nearest, index = chunk, chunk_index
        else:
            closer = chunk < nearest
            nearest, index = torch.where(closer, chunk, nearest), torch.where(closer, chunk_index, index)
    # the expansion finds the nearest row; its distance is measured directly: |q|^2 - 2 q.r + |r|^2 cancels to a few
    # float32 ulps of |q|^2, which the square root magnifies near 0 (and the ONNX and torch paths would disagree there)
    distance = (queries - bank[index]).norm(dim=1).view(b, 1, h, w)
    return F.interpolate(distance, size=(size, size), mode="bilinear", align_corners=False)


def greedy_coreset(features: Tensor, size: int, generator: torch.Generator, projection_dim: int = 128) -> Tensor:
    """Indices [min(size, N)] of a greedy k-center coreset of `features` [N, D] (PatchCore's subsampling): each pick is
    the row farthest from those picked so far, distances measured after a seeded random projection to
    `projection_dim` dimensions (Johnson-Lindenstrauss) to save time; the first pick is drawn with `generator`."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    x = features
    if features.shape[1] > projection_dim:
        matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = features @ matrix.to(features)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    squared = (x * x).sum(1)
    nearest = torch.full((n,), float("inf"), dtype=x.dtype)
    for i in progress(range(1, size), desc="coreset", unit="pick", leave=False, mininterval=2.0):
        last = x[chosen[i - 1]]
        nearest = torch.minimum(nearest, squared - 2.0 * (x @ last) + squared[chosen[i - 1]])
        chosen[i] = int(torch.argmax(nearest))
    return chosen


def fit_feature_memory(backbone: torch.nn.Module, pool: int, images: Sequence, size: int, seed: int,
                       device: torch.device, batch_size: int = 16) -> Tensor:
    """Bank [min(size, N), D] of good patch descriptors from `images` (a sequence of [C, S, S] in [0, 1]): every
    location's ``patch_features``, then a ``greedy_coreset`` of `size` rows over at most CORESET_CANDIDATES of them
    (drawn at random with `seed`), so fitting time stays bounded on large training sets."""
    rows = []
    with torch.no_grad():
        for chunk in progress(batched(images, batch_size), total=-(-len(images) // batch_size), desc="feature memory",
                          unit="batch", leave=False):
            x = torch.stack([torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in chunk]).to(device)
            f = patch_features(backbone(x), pool)
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
    features = torch.cat(rows)
    generator = torch.Generator().manual_seed(seed)
    if features.shape[0] > CORESET_CANDIDATES:
        features = features[torch.randperm(features.shape[0], generator=generator)[:CORESET_CANDIDATES]]
    return features[greedy_coreset(features, size, generator)].contiguous()


class FeatureMemory(Component):
    """Distance of each patch descriptor of the input to the nearest row of a bank of good ones [M, D], blurred."""

    name = "feature_memory"
    needs_reconstruction = False
    needs_features = True
    referenced = False
    state_key = "feature_memory"
    fit_settings = ("memory_size", "seed")
    memory_bank: Tensor

    def __init__(self, pool: int, sigma: float, memory_size: int, seed: int) -> None:
        super().__init__()
        self.pool, self.sigma, self.memory_size, self.seed = pool, sigma, memory_size, seed
        self.register_buffer("memory_bank", torch.zeros(0), persistent=False)  # [M, D] good patch features

    @property
    def fitted(self) -> bool:
        """True when the bank is set."""
        return self.memory_bank.numel() > 0

    def forward(self, work: SharedWork) -> Tensor:
        if not self.fitted:
            raise ValueError("the feature_memory component has no bank of good patch features: calibrate first "
                             "(`anoddpm calibrate`)")
        size = work.images.shape[-1]
        distances = memory_distance_map(patch_features(work.features, self.pool), self.memory_bank, size)
        return gaussian_blur(distances, self.sigma)

    def fit(self, images: Sequence[Tensor], backbone: nn.Module | None, device: torch.device) -> None:
        """The bank: a coreset of ``memory_size`` patch descriptors of `images` (good training images or tiles)."""
        if len(images) == 0:
            raise ValueError("detect.scorer uses feature_memory, which needs the training images to fit its bank; "
                             "none were given")
        self.load_fitted_state(fit_feature_memory(backbone, self.pool, images, self.memory_size, self.seed, device))

    def reset(self) -> None:
        self.memory_bank = torch.zeros(0, device=self.memory_bank.device)

    def fitted_state(self) -> Tensor | None:
        return self.memory_bank.detach().cpu() if self.fitted else None

    def load_fitted_state(self, state: Any) -> None:
        """Use `state` [M, D] (``patch_features`` rows of good training patches)."""
        bank = torch.as_tensor(state, dtype=torch.float32, device=self.memory_bank.device)
        if bank.ndim != 2 or bank.shape[0] < 1 or not bool(torch.isfinite(bank).all()):
            raise ValueError(f"feature memory must be a finite M x D matrix, got {tuple(bank.shape)}")
        self.memory_bank = bank
