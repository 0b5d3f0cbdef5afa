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

Feature-space components (need a frozen pretrained backbone, ``anoddpm.backbone``): 'feature_residual' is the
distance between the backbone features of the input and of its reconstruction (DDAD), 'feature_memory' the distance
of the input's patch features to the nearest ones in a bank of good training patches (PatchCore; the bank is fitted at
calibration, ``set_feature_memory``, stored as ``feature_memory``). A feature_memory map is already a distance to good
parts, so map references do not apply to it (its training-split maps, which fit the nearest_good bank, would be 0:
the training patches are the memory). With feature_memory alone nothing is reconstructed.

Paper path (sampler 'ancestral'): ``depth`` DDPM steps with fresh noise per step from a
generator re-seeded with ``cfg.detect.seed`` at every call, each draw made for one image and shared
by the batch (as on the fast path), so an image's score does not depend on its batch.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from anoddpm.backbone import FeatureExtractor, build_backbone
from anoddpm.config import Config, scorer_components
from anoddpm.feature_scoring import feature_residual_map, memory_distance_map, patch_features
from anoddpm.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.head import ScoringHead, build_head
from anoddpm.intensity import denormalise, intensity_stats, normalise
from anoddpm.unet import UNet, build_unet
from eval.neighbour_reference import neighbour_reference, thumbnail_features, thumbnail_length
from eval.scoring import anomaly_map, gaussian_blur, image_score
from noise import make_noise


def combine_component_maps(components: Tensor, fusion: str = "geometric") -> Tensor:
    """Component maps [B, K, S, S] (>= 0) -> one map [B, 1, S, S] (K = 1: unchanged).

    geometric: the per-pixel geometric mean; a pixel scores high only where every component finds it, and
    rescaling one component rescales the result without changing any ranking. max: the per-pixel maximum; a
    pixel scores high where any component finds it (the components must be in comparable units: the
    Detector divides each by its fitted ``component_scale``).
    """
    if components.shape[1] == 1:
        return components
    if fusion == "max":
        return components.amax(dim=1, keepdim=True)
    return components.clamp_min(0).prod(dim=1, keepdim=True).pow(1.0 / components.shape[1])


class Detector(nn.Module):
    """UNet + diffusion (+ scoring head) (+ backbone) + cfg.detect as one module:
    forward(images) -> (anomaly_map, pred_score, reconstruction)."""

    detection_noise: Tensor
    map_reference: Tensor
    bank_features: Tensor
    bank_maps: Tensor
    memory_bank: Tensor
    referenced: Tensor

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, cfg: Config, head: ScoringHead | None = None,
                 backbone: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.unet = unet
        self.diffusion = diffusion
        scorer = cfg.detect.scorer
        self.components = scorer_components(scorer, head is not None)
        if "head" in self.components and head is None:
            raise ValueError(f"detect.scorer={scorer!r} needs a learned scoring head; this model has none "
                             "(train with head.enabled, or use detect.scorer 'residual' or 'auto')")
        uses_features = any(name.startswith("feature_") for name in self.components)
        if uses_features and backbone is None:
            raise ValueError(f"detect.scorer={scorer!r} needs a pretrained backbone (anoddpm.backbone)")
        self.head = head if "head" in self.components else None
        self.backbone = backbone if uses_features else None
        self.register_buffer("memory_bank", torch.zeros(0), persistent=False)  # [M, D] good patch features
        self.register_buffer("referenced", torch.tensor([name != "feature_memory" for name in self.components]),
                             persistent=False)
        d = cfg.data
        shape = (cfg.detect.samples, d.channels, d.input_side, d.input_side)
        generator = torch.Generator().manual_seed(cfg.detect.seed)
        t = torch.full((shape[0],), float(cfg.detect.depth - 1))
        self.register_buffer("detection_noise", self._noise(shape, t, generator, torch.device("cpu")), persistent=False)
        shape = (1, len(self.components), d.input_side, d.input_side)
        self.register_buffer("map_reference", torch.ones(shape), persistent=False)
        self.has_map_reference = False
        self.register_buffer("component_scale", torch.ones(len(self.components)), persistent=False)
        self.has_component_scale = False
        self.register_buffer("bank_features", torch.zeros(0), persistent=False)  # [N, F] thumbnails
        self.register_buffer("bank_maps", torch.zeros(0), persistent=False)  # [N, K, s, s] pooled component maps

    @property
    def has_feature_memory(self) -> bool:
        """True when a feature_memory bank is set."""
        return self.memory_bank.numel() > 0

    def set_feature_memory(self, bank: Tensor | None) -> None:
        """Use `bank` [M, D] (good training patch features, ``patch_features`` rows) for feature_memory; None = none."""
        device = self.map_reference.device
        if bank is None:
            self.memory_bank = torch.zeros(0, device=device)
            return
        bank = torch.as_tensor(bank, dtype=torch.float32, device=device)
        if bank.ndim != 2 or bank.shape[0] < 1 or not bool(torch.isfinite(bank).all()):
            raise ValueError(f"feature memory must be a finite M x D matrix, got {tuple(bank.shape)}")
        self.memory_bank = bank

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

    def set_component_scale(self, scale: Tensor | None) -> None:
        """Divide future referenced component maps by `scale` [K] (> 0, one per component: their typical
        good-image maximum, so that ``detect.fusion`` max compares like with like); None = 1 each."""
        if scale is None:
            self.component_scale.fill_(1.0)
            self.has_component_scale = False
            return
        scale = torch.as_tensor(scale, dtype=self.component_scale.dtype).reshape(-1)
        if scale.numel() != self.component_scale.numel() or not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise ValueError(f"component scale must hold {self.component_scale.numel()} positive values "
                             f"(one per component: {', '.join(self.components)}), got {scale.tolist()}")
        self.component_scale.copy_(scale.to(self.component_scale.device))
        self.has_component_scale = True

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
        any reference; reconstruction [B, C, S, S] in [0, 1], the images themselves when no component needs one).
        One reconstruction serves every component."""
        det = self.cfg.detect
        stats = self._intensity_stats(images)
        needs_reconstruction = any(name != "feature_memory" for name in self.components)
        reconstruction = self._reconstruct(images, stats) if needs_reconstruction else images
        features = self._backbone_features(images, reconstruction)
        size = images.shape[-1]
        maps = []
        for name in self.components:
            if name == "residual":
                seen, rebuilt = images, reconstruction
                if stats is not None:  # the residual in the units the model worked in
                    seen, rebuilt = normalise(images, stats), normalise(reconstruction, stats)
                maps.append(anomaly_map(seen, rebuilt, det.residual, det.smoothing_sigma, det.residual_norm))
                continue
            if name == "head":
                amap = self.head.anomaly_map(images, reconstruction)
            elif name == "feature_residual":
                amap = feature_residual_map(*features, size)
            else:
                if not self.has_feature_memory:
                    raise ValueError("the feature_memory component has no bank of good patch features: calibrate "
                                     "first (`anoddpm calibrate`)")
                amap = memory_distance_map(patch_features(features[0], self.cfg.backbone.pool), self.memory_bank, size)
            maps.append(gaussian_blur(amap, det.smoothing_sigma))
        return torch.cat(maps, dim=1), reconstruction

    def _backbone_features(self, images: Tensor, reconstruction: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(stage features of the images, of the reconstructions); empty lists when not needed."""
        if self.backbone is None:
            return [], []
        if "feature_residual" not in self.components:
            return self.backbone(images), []
        both = self.backbone(torch.cat([images, reconstruction]))
        n = images.shape[0]
        return [f[:n] for f in both], [f[n:] for f in both]

    def referenced_components(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (component maps [B, K, S, S], each divided by its fitted reference,
        before any component scale; reconstruction [B, C, S, S])."""
        det = self.cfg.detect
        components, reconstruction = self.component_maps(images)  # [B, K, S, S]
        reference = None
        if self.has_map_reference and det.map_reference == "good_mean":
            reference = self.map_reference
        elif self.has_reference_bank and det.map_reference == "nearest_good":
            k = min(det.reference_neighbours, self.bank_features.shape[0])
            reference = neighbour_reference(thumbnail_features(images), self.bank_features, self.bank_maps, k,
                                            components.shape[-1])
        if reference is not None and not bool(self.referenced.all()):
            reference = torch.where(self.referenced.view(1, -1, 1, 1), reference, torch.ones_like(reference))
        if reference is not None:
            components = components / reference
        return components, reconstruction

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (anomaly_map [B, 1, S, S], pred_score [B],
        reconstruction [B, C, S, S] in [0, 1])."""
        det = self.cfg.detect
        components, reconstruction = self.referenced_components(images)
        if self.has_component_scale:
            components = components / self.component_scale.view(1, -1, 1, 1)
        amap = combine_component_maps(components, det.fusion)
        return amap, image_score(amap, det.score, det.topk), reconstruction

    @classmethod
    def from_config(cls, cfg: Config, state_dict: dict[str, Tensor] | None = None,
                    head_state_dict: dict[str, Tensor] | None = None, backbone_sha256: str | None = None) -> "Detector":
        """Detector with a fresh UNet built from cfg, loading `state_dict` (UNet weights) when given, a scoring
        head loaded from `head_state_dict` when given and cfg.detect.scorer uses it, and the frozen backbone of
        cfg.backbone when a component needs it (refused when its weights' SHA-256 is not `backbone_sha256`)."""
        unet = build_unet(cfg)
        if state_dict is not None:
            unet.load_state_dict(state_dict)
        components = scorer_components(cfg.detect.scorer, head_state_dict is not None)
        head = None
        if head_state_dict is not None and "head" in components:
            head = build_head(cfg)
            head.load_state_dict(head_state_dict)
        backbone = None
        if any(name.startswith("feature_") for name in components):
            backbone = build_backbone(cfg.backbone, backbone_sha256)
        return cls(unet, GaussianDiffusion.from_config(cfg.diffusion), cfg, head, backbone)

    @classmethod
    def from_bundle(cls, bundle: Any, device: torch.device | str = "cpu", **detect_overrides: Any) -> "Detector":
        """Detector in eval mode on `device` from a loaded bundle (.cfg, .state_dict = EMA UNet weights,
        optional .head_state_dict = scoring head weights, optional .map_reference [1, K, S, S],
        .reference_bank {"features", "maps"}, .feature_memory [M, D] and .component_scale [K], applied only when .threshold was
        calibrated with the detection settings and components now in use; .backbone {"name", "sha256"}: the
        backbone weights it was calibrated with, refused when the installed ones differ).

        detect_overrides replace cfg.detect fields (None values keep the bundle's).
        """
        from anoddpm.settings_guard import calibrated_for

        cfg = bundle.cfg.override("detect", **detect_overrides).validate()
        head_state = getattr(bundle, "head_state_dict", None)
        identity = getattr(bundle, "backbone", None) or {}
        try:
            detector = cls.from_config(cfg, bundle.state_dict, head_state, identity.get("sha256"))
        except RuntimeError as err:  # load_state_dict: missing or unexpected keys, wrong shapes
            first = str(err).strip().splitlines()
            raise ValueError(f"{getattr(bundle, 'path', 'the bundle')}: its weights do not fit its config "
                             f"({' '.join(first[:2])[:300]}); the file was altered or mixes two models") from err
        if calibrated_for(getattr(bundle, "threshold", None), detector):  # references belong to their calibration
            reference, bank = getattr(bundle, "map_reference", None), getattr(bundle, "reference_bank", None)
            memory, scale = getattr(bundle, "feature_memory", None), getattr(bundle, "component_scale", None)
            if scale is not None:
                detector.set_component_scale(scale)
            if reference is not None:
                detector.set_map_reference(reference)
            if bank is not None:
                detector.set_reference_bank(bank["features"], bank["maps"])
            if memory is not None and "feature_memory" in detector.components:
                detector.set_feature_memory(memory)
        return detector.to(device).eval()
