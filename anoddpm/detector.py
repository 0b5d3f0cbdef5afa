"""Detector: [0, 1] images -> partial-diffusion reconstruction -> anomaly map and image score.

Fast path (sampler 'ddim'): the detection noise is a fixed buffer drawn once from
``cfg.detect.seed`` for one image and shared by every batch item, so an image's score never
depends on the batch it was in; timesteps are Python constants, so ``forward`` traces to ONNX.
With ``detect.samples > 1`` the reconstructions (not the maps) are averaged: the returned
reconstruction is then exactly the one the map was computed from.

Scoring (``cfg.detect.scorer``): 'residual' is the plain AnoDDPM map (``eval.scoring.anomaly_map``);
'head' is the learned scoring head's anomaly probability (``anoddpm.head``) smoothed with the same
Gaussian; 'fused' is the per-pixel geometric mean of both, each divided by its own reference
(``combine_component_maps``); 'auto' picks 'fused' when a head is given (a bundle trained with
``head.enabled``), else 'residual'.

Map reference (``cfg.detect.map_reference``): each component map (one, two for 'fused') is divided per
pixel by a reference. 'nearest_good': the mean map of the k training images nearest to the input in a
grey thumbnail (``eval.neighbour_reference``), from a bank fitted at calibration (``set_reference_bank``;
stored in the bundle as ``reference_bank``). 'good_mean': one reference map [1, K, S, S] fitted at
calibration on held-back good images (``set_map_reference``; stored as ``map_reference``). Without one
(uncalibrated or older bundles) the components are combined as they are.

Paper path (sampler 'ancestral'): ``depth`` DDPM steps with fresh noise per step from a
generator re-seeded with ``cfg.detect.seed`` at every call, each draw made for one image and shared
by the batch (as on the fast path), so an image's score does not depend on its batch.
"""
from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from anoddpm.config import Config
from anoddpm.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.head import ScoringHead, build_head
from anoddpm.intensity import denormalise, intensity_stats, normalise
from anoddpm.unet import UNet, build_unet
from eval.neighbour_reference import neighbour_reference, thumbnail_features, thumbnail_length
from eval.scoring import anomaly_map, gaussian_blur, image_score
from noise import make_noise


def combine_component_maps(components: Tensor) -> Tensor:
    """Component maps [B, K, S, S] (>= 0) -> their per-pixel geometric mean [B, 1, S, S] (K = 1: unchanged).

    A pixel scores high only where every component finds it, and rescaling one component (its units,
    its reference) rescales the result without changing any ranking: no weights to tune.
    """
    if components.shape[1] == 1:
        return components
    return components.clamp_min(0).prod(dim=1, keepdim=True).pow(1.0 / components.shape[1])


class Detector(nn.Module):
    """UNet + diffusion (+ scoring head) + cfg.detect as one module:
    forward(images) -> (anomaly_map, pred_score, reconstruction)."""

    detection_noise: Tensor
    map_reference: Tensor
    bank_features: Tensor
    bank_maps: Tensor

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, cfg: Config, head: ScoringHead | None = None) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.unet = unet
        self.diffusion = diffusion
        scorer = cfg.detect.scorer
        if scorer in ("head", "fused") and head is None:
            raise ValueError(f"detect.scorer={scorer!r} needs a learned scoring head; this model has none "
                             "(train with head.enabled, or use detect.scorer 'residual' or 'auto')")
        self.head = head if scorer != "residual" else None
        self.components = self._components(scorer, self.head is not None)
        d = cfg.data
        shape = (cfg.detect.samples, d.channels, d.input_side, d.input_side)
        generator = torch.Generator().manual_seed(cfg.detect.seed)
        t = torch.full((shape[0],), float(cfg.detect.depth - 1))
        self.register_buffer("detection_noise", self._noise(shape, t, generator, torch.device("cpu")), persistent=False)
        shape = (1, len(self.components), d.input_side, d.input_side)
        self.register_buffer("map_reference", torch.ones(shape), persistent=False)
        self.has_map_reference = False
        self.register_buffer("bank_features", torch.zeros(0), persistent=False)  # [N, F] thumbnails
        self.register_buffer("bank_maps", torch.zeros(0), persistent=False)  # [N, K, s, s] pooled component maps

    @staticmethod
    def _components(scorer: str, has_head: bool) -> tuple[str, ...]:
        if scorer == "fused" or (scorer == "auto" and has_head):
            return ("residual", "head")
        return ("head",) if scorer == "head" else ("residual",)

    def set_map_reference(self, reference: Tensor | None) -> None:
        """Divide future component maps by `reference` [K, S, S] or [1, K, S, S] (> 0; [S, S] when K = 1);
        None = no reference."""
        if reference is None:
            self.map_reference.fill_(1.0)
            self.has_map_reference = False
            return
        shape = self.map_reference.shape
        reference = torch.as_tensor(reference, dtype=self.map_reference.dtype).reshape(-1)
        if reference.numel() != self.map_reference.numel() or not bool((reference > 0).all()):
            raise ValueError(f"map reference must hold {shape[1]} x {shape[2]}x{shape[3]} positive values "
                             f"(one map per component: {', '.join(self.components)}), got {reference.numel()} values")
        self.map_reference.copy_(reference.view(shape))
        self.has_map_reference = True

    @property
    def has_reference_bank(self) -> bool:
        """True when a nearest_good reference bank is set."""
        return self.bank_features.numel() > 0

    def set_reference_bank(self, features: Tensor | None, maps: Tensor | None = None) -> None:
        """Use the bank of good-image thumbnails `features` [N, F] (``thumbnail_features``) and their pooled
        component maps `maps` [N, K, s, s] (``pool_bank_maps``, >= 0) for nearest_good references; None = no bank."""
        device = self.map_reference.device
        if features is None:
            self.bank_features, self.bank_maps = torch.zeros(0, device=device), torch.zeros(0, device=device)
            return
        features = torch.as_tensor(features, dtype=torch.float32, device=device)
        maps = torch.as_tensor(maps, dtype=torch.float32, device=device)
        side = self.cfg.data.input_side
        n_features = thumbnail_length(side)
        k = len(self.components)
        n = features.shape[0] if features.ndim == 2 else -1
        if (n < 1 or features.shape[1] != n_features or maps.ndim != 4 or maps.shape[:2] != (n, k)
                or side % maps.shape[-1] or maps.shape[-1] != maps.shape[-2]):
            raise ValueError(f"reference bank must hold N x {n_features} thumbnails and N x {k} x s x s maps "
                             f"(one per component: {', '.join(self.components)}), got {tuple(features.shape)} and "
                             f"{tuple(maps.shape)}")
        if not bool((maps >= 0).all()) or not bool(torch.isfinite(features).all()):
            raise ValueError("reference bank maps must be >= 0 and its thumbnails finite")
        self.bank_features, self.bank_maps = features, maps

    def _noise(self, shape: tuple[int, ...], t: Tensor, generator: torch.Generator, device: torch.device) -> Tensor:
        diff = self.cfg.diffusion
        return make_noise(
            self.cfg.detect.noise, shape, t=t, generator=generator, device=device, octaves=diff.octaves,
            persistence=diff.persistence, frequency=diff.frequency, standardise=diff.standardise,
        )

    def _intensity_stats(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        mode = self.cfg.data.intensity
        return None if mode == "none" else intensity_stats(images, mode)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Reconstruction [B, C, S, S] in [0, 1] of images [B, C, S, S] in [0, 1], averaged over detect.samples."""
        return self._reconstruct(images, self._intensity_stats(images))

    def _reconstruct(self, images: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        det = self.cfg.detect
        x_start = (images if stats is None else normalise(images, stats)) * 2.0 - 1.0
        generator = None
        if det.sampler == "ancestral":
            generator = torch.Generator(device=images.device).manual_seed(det.seed)
        total = torch.zeros_like(x_start)
        for s in range(det.samples):
            if det.sampler == "ddim":
                noise = self.detection_noise[s : s + 1].expand_as(x_start)
                step_noise = None
            else:
                noise = self._step_noise(x_start, det.depth - 1, generator)
                step_noise = functools.partial(self._step_noise, x_start, generator=generator)
            total = total + partial_diffusion_reconstruct(
                self.unet, self.diffusion, x_start, det.depth, det.steps, det.sampler, noise, step_noise
            )
        reconstruction = (total / det.samples + 1.0) / 2.0
        return (reconstruction if stats is None else denormalise(reconstruction, stats)).clamp(0.0, 1.0)

    def _step_noise(self, x: Tensor, t: int, generator: torch.Generator) -> Tensor:
        """Noise drawn for one image and shared by the batch, so no image's score depends on its batch."""
        one = (1, *x.shape[1:])
        return self._noise(one, torch.full((1,), float(t)), generator, x.device).to(x.dtype).expand_as(x)

    def component_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (component maps [B, K, S, S], one per ``self.components``, before
        any reference; reconstruction [B, C, S, S] in [0, 1]). One reconstruction serves every component."""
        det = self.cfg.detect
        stats = self._intensity_stats(images)
        reconstruction = self._reconstruct(images, stats)
        maps = []
        for name in self.components:
            if name == "residual":
                seen, rebuilt = images, reconstruction
                if stats is not None:  # the residual in the units the model worked in
                    seen, rebuilt = normalise(images, stats), normalise(reconstruction, stats)
                maps.append(anomaly_map(seen, rebuilt, det.residual, det.smoothing_sigma, det.residual_norm))
            else:
                maps.append(gaussian_blur(self.head.anomaly_map(images, reconstruction), det.smoothing_sigma))
        return torch.cat(maps, dim=1), reconstruction

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (anomaly_map [B, 1, S, S], pred_score [B],
        reconstruction [B, C, S, S] in [0, 1])."""
        det = self.cfg.detect
        components, reconstruction = self.component_maps(images)  # [B, K, S, S]
        if self.has_map_reference and det.map_reference == "good_mean":
            components = components / self.map_reference
        elif self.has_reference_bank and det.map_reference == "nearest_good":
            k = min(det.reference_neighbours, self.bank_features.shape[0])
            components = components / neighbour_reference(thumbnail_features(images), self.bank_features,
                                                          self.bank_maps, k, components.shape[-1])
        amap = combine_component_maps(components)
        return amap, image_score(amap, det.score, det.topk), reconstruction

    @classmethod
    def from_config(cls, cfg: Config, state_dict: dict[str, Tensor] | None = None,
                    head_state_dict: dict[str, Tensor] | None = None) -> "Detector":
        """Detector with a fresh UNet built from cfg, loading `state_dict` (UNet weights) when given,
        and a scoring head loaded from `head_state_dict` when given and cfg.detect.scorer allows it."""
        unet = build_unet(cfg)
        if state_dict is not None:
            unet.load_state_dict(state_dict)
        head = None
        if head_state_dict is not None and cfg.detect.scorer != "residual":
            head = build_head(cfg)
            head.load_state_dict(head_state_dict)
        return cls(unet, GaussianDiffusion.from_config(cfg.diffusion), cfg, head)

    @classmethod
    def from_bundle(cls, bundle: Any, device: torch.device | str = "cpu", **detect_overrides: Any) -> "Detector":
        """Detector in eval mode on `device` from a loaded bundle (.cfg, .state_dict = EMA UNet weights,
        optional .head_state_dict = scoring head weights, optional .map_reference [1, K, S, S] and
        .reference_bank {"features", "maps"}, applied only when .threshold was calibrated with the detection
        settings now in use).

        detect_overrides replace cfg.detect fields (None values keep the bundle's).
        """
        cfg = bundle.cfg.override("detect", **detect_overrides).validate()
        head_state = getattr(bundle, "head_state_dict", None)
        try:
            detector = cls.from_config(cfg, bundle.state_dict, head_state)
        except RuntimeError as err:  # load_state_dict: missing or unexpected keys, wrong shapes
            first = str(err).strip().splitlines()
            raise ValueError(f"{getattr(bundle, 'path', 'the bundle')}: its weights do not fit its config "
                             f"({' '.join(first[:2])[:300]}); the file was altered or mixes two models") from err
        reference, bank = getattr(bundle, "map_reference", None), getattr(bundle, "reference_bank", None)
        if reference is not None or bank is not None:
            from anoddpm.settings_guard import same_detect_settings

            calibrated = (getattr(bundle, "threshold", None) or {}).get("detect")
            if same_detect_settings(calibrated, asdict(cfg.detect)):  # a reference belongs to its calibration
                if reference is not None:
                    detector.set_map_reference(reference)
                if bank is not None:
                    detector.set_reference_bank(bank["features"], bank["maps"])
        return detector.to(device).eval()
