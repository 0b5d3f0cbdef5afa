"""What a component map is: one ``Component`` per map the Detector combines, and the shared work of a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass
class SharedWork:
    """What the components of one batch share, computed once by the Detector.

    images, reconstruction: [B, C, S, S] in [0, 1] (reconstruction is the images themselves when no component needs
    one); stats: the per-image intensity statistics the model worked with (None for data.intensity 'none');
    features, rebuilt_features: backbone stage features [B, C_i, h_i, w_i] of the images and of the reconstructions
    (empty lists when no component needs them)."""

    images: Tensor
    reconstruction: Tensor
    stats: tuple[Tensor, Tensor] | None
    features: list[Tensor]
    rebuilt_features: list[Tensor]


class Component(nn.Module):
    """One component map: ``forward(work) -> [B, 1, S, S] >= 0``, before any map reference.

    Class attributes say what it needs from the shared work and how the levels above treat it; a component with
    state fitted from good images implements ``fit`` and keeps that state under ``state_key`` in the bundle."""

    name: str = ""
    needs_reconstruction: bool = True  # uses work.reconstruction
    needs_features: bool = False  # uses work.features
    needs_rebuilt_features: bool = False  # uses work.rebuilt_features
    referenced: bool = True  # map references (detect.map_reference) divide its map
    state_key: str | None = None  # bundle key of its fitted state; None = nothing fitted
    fit_settings: tuple[str, ...] = ()  # detect fields the fitted state depends on (besides the training images)

    def forward(self, work: SharedWork) -> Tensor:  # pragma: no cover - every component defines it
        raise NotImplementedError

    def fit(self, images: Sequence[Tensor], backbone: nn.Module | None, device: torch.device) -> None:
        """Fit the component's state from good training images [C, S, S] in [0, 1] (default: nothing to fit)."""

    def reset(self) -> None:
        """Forget the fitted state (default: none)."""

    def fitted_state(self) -> Any:
        """The fitted state on the CPU for the bundle (None when not fitted or nothing to fit)."""
        return None

    def load_fitted_state(self, state: Any) -> None:
        """Use a fitted state read from a bundle (default: nothing to load)."""
