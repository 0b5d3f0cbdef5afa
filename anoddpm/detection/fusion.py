"""How component maps become one anomaly map (``detect.fusion``) and the per-component scale 'max' needs.

'geometric': the per-pixel geometric mean; a pixel scores high only where every component finds it, and rescaling
one component rescales the result without changing any ranking. 'max': the per-pixel maximum; a pixel scores high
where any component finds it, so the components must be in comparable units: each is divided by its fitted
``component_scale``, its median maximum over held-back good images (stored in the bundle as ``component_scale``).
'mean': the per-pixel mean in those same units, DDAD's map (Mousakhan et al. 2023 add the feature and pixel maps, the
pixel map rescaled to the feature map's maximum per batch; a scale fitted on good images keeps scores batch-invariant).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def combine_component_maps(components: Tensor, fusion: str = "geometric") -> Tensor:
    """Component maps [B, K, S, S] (>= 0) -> one map [B, 1, S, S] (K = 1: unchanged), by 'geometric', 'max' or
    'mean'."""
    if components.shape[1] == 1:
        return components
    if fusion == "max":
        return components.amax(dim=1, keepdim=True)
    if fusion == "mean":
        return components.mean(dim=1, keepdim=True)
    return components.clamp_min(0).prod(dim=1, keepdim=True).pow(1.0 / components.shape[1])


def component_scale(maxima: np.ndarray) -> Tensor:
    """Per-image maxima [N, K] of good images' referenced component maps -> the scale of each component [K]:
    the median maximum (floored at 1e-12), so each component reads 1 at a typical good image's worst pixel."""
    return torch.from_numpy(np.maximum(np.median(maxima, axis=0), 1e-12).astype(np.float32))


class Fusion(nn.Module):
    """forward(referenced component maps [B, K, S, S]) -> anomaly map [B, 1, S, S]; owns ``component_scale`` [K]."""

    component_scale: Tensor

    def __init__(self, mode: str, names: tuple[str, ...]) -> None:
        super().__init__()
        self.mode, self.names = mode, names
        self.register_buffer("component_scale", torch.ones(len(names)), persistent=False)
        self.has_component_scale = False

    @property
    def scales_components(self) -> bool:
        """True when the maps are fused by 'max' or 'mean' and so need each component in comparable units."""
        return self.mode in ("max", "mean") and len(self.names) > 1

    def fit(self, maxima: np.ndarray) -> None:
        """The scale of each component from per-image maxima [N, K] of good images' referenced maps."""
        self.load_fitted_state(component_scale(maxima))

    def reset(self) -> None:
        """Back to a scale of 1 each."""
        self.component_scale.fill_(1.0)
        self.has_component_scale = False

    def scaled(self, components: Tensor) -> Tensor:
        """Referenced component maps [B, K, S, S] over their fitted scale (unchanged when none is fitted)."""
        if not self.has_component_scale:
            return components
        return components / self.component_scale.view(1, -1, 1, 1)

    def forward(self, components: Tensor) -> Tensor:
        return combine_component_maps(self.scaled(components), self.mode)

    def fitted_state(self) -> Tensor | None:
        """[K] on the CPU, None when not fitted."""
        return self.component_scale.detach().cpu() if self.has_component_scale else None

    def load_fitted_state(self, scale: Tensor | None) -> None:
        """Use `scale` [K] (> 0, one per component); None = 1 each."""
        if scale is None:
            self.reset()
            return
        scale = torch.as_tensor(scale, dtype=self.component_scale.dtype).reshape(-1)
        if scale.numel() != self.component_scale.numel() or not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise ValueError(f"component scale must hold {self.component_scale.numel()} positive values "
                             f"(one per component: {', '.join(self.names)}), got {scale.tolist()}")
        self.component_scale.copy_(scale.to(self.component_scale.device))
        self.has_component_scale = True
