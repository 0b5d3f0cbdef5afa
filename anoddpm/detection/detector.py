"""Detector: [0, 1] images -> partial-diffusion reconstruction -> component maps -> references -> fusion -> score.

One forward pass, top to bottom: reconstruct once (``reconstruction``, when a component needs it), extract backbone
features once (``backbone``, when a component needs them), compute each component map (``components/``, named by
``cfg.detect.scorer``), divide the referenced ones by their good-image reference (``references``), combine them
(``fusion``) and reduce the map to the image score (``maps.image_score``). A retrieval-conditioned model
(``model.condition`` 'retrieval') extracts the backbone features first: the neighbours they retrieve
(``retrieval``) condition the reconstruction. Every fitted state has one owner: the feature_memory bank its
component, the retrieval database ``RetrievalDatabase``, the map references ``MapReference``, the component scales
``Fusion``;
``anoddpm.detection.calibration`` fits them all and ``fitted_state`` / ``load_fitted_state`` carry them to and from
the bundle. Everything in ``forward`` traces to ONNX.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from anoddpm.config import Config, scorer_components
from anoddpm.detection.backbone import FeatureExtractor, backbone_identity, build_backbone
from anoddpm.detection.components import SharedWork, build_components
from anoddpm.detection.fusion import Fusion, combine_component_maps
from anoddpm.detection.maps import image_score
from anoddpm.detection.reconstruction import Reconstructor
from anoddpm.detection.references import MapReference
from anoddpm.detection.retrieval import RetrievalDatabase
from anoddpm.detection.settings import calibrated_for
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.head import ScoringHead, build_head
from anoddpm.model.unet import UNet, build_unet

__all__ = ["FITTED_KEYS", "Detector", "combine_component_maps"]
FITTED_KEYS = ("map_reference", "reference_bank", "feature_memory", "component_scale", "backbone",
               "retrieval")  # bundle keys


class Detector(nn.Module):
    """UNet + diffusion (+ scoring head) (+ backbone) (+ adapted backbone) + cfg.detect as one module:
    forward(images) -> (anomaly_map, pred_score, reconstruction)."""

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, cfg: Config, head: ScoringHead | None = None,
                 backbone: FeatureExtractor | None = None, adapted: FeatureExtractor | None = None) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        scorer = cfg.detect.scorer
        self.components = scorer_components(scorer, head is not None)  # names of the component maps, in order
        if "head" in self.components and head is None:
            raise ValueError(f"detect.scorer={scorer!r} needs a learned scoring head; this model has none "
                             "(train with head.enabled, or use detect.scorer 'residual' or 'auto')")
        # one Component per name; `adapted` (the backbone adapted to the reconstructions) serves feature_residual
        self.parts = nn.ModuleList(build_components(self.components, cfg, head, adapted))
        self.retrieval = RetrievalDatabase(cfg) if cfg.model.condition == "retrieval" else None
        needs_features = any(part.needs_features for part in self.parts) or self.retrieval is not None
        if needs_features and backbone is None:
            raise ValueError(f"detect.scorer={scorer!r} with model.condition={cfg.model.condition!r} needs a "
                             "pretrained backbone (anoddpm.detection.backbone)")
        self.reconstructor = Reconstructor(unet, diffusion, cfg)
        self.backbone = backbone if needs_features else None
        self.reference = MapReference(cfg.detect.map_reference, cfg.detect.reference_neighbours, self.components,
                                      [part.referenced for part in self.parts], cfg.data.input_side)
        self.fusion = Fusion(cfg.detect.fusion, self.components)

    @property
    def unet(self) -> UNet:
        """The eps-UNet (EMA weights)."""
        return self.reconstructor.unet

    @property
    def diffusion(self) -> GaussianDiffusion:
        """The diffusion schedule."""
        return self.reconstructor.diffusion

    @property
    def head(self) -> ScoringHead | None:
        """The learned scoring head when a component uses it, else None."""
        return next((part.head for part in self.parts if part.name == "head"), None)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Reconstruction [B, C, S, S] in [0, 1] of images [B, C, S, S] in [0, 1], averaged over detect.samples."""
        condition = None if self.retrieval is None else self.retrieval(self.backbone(images))
        return self.reconstructor(images, self.reconstructor.intensity_stats(images), condition)

    def shared_work(self, images: Tensor) -> SharedWork:
        """What the components of a batch of images [B, C, S, S] in [0, 1] need, each computed once."""
        stats = self.reconstructor.intensity_stats(images)
        needs_reconstruction = any(part.needs_reconstruction for part in self.parts)
        if self.retrieval is not None:
            return self._conditioned_work(images, stats, needs_reconstruction)
        reconstruction = self.reconstructor(images, stats) if needs_reconstruction else images
        features, rebuilt = [], []
        if self.backbone is not None:
            if any(part.needs_rebuilt_features for part in self.parts):
                both = self.backbone(torch.cat([images, reconstruction]))
                n = images.shape[0]
                features, rebuilt = [f[:n] for f in both], [f[n:] for f in both]
            else:
                features = self.backbone(images)
        return SharedWork(images=images, reconstruction=reconstruction, stats=stats, features=features,
                          rebuilt_features=rebuilt)

    def _conditioned_work(self, images: Tensor, stats: tuple[Tensor, Tensor] | None,
                          needs_reconstruction: bool) -> SharedWork:
        """``shared_work`` of a retrieval-conditioned model: the features first, then the reconstruction conditioned
        on the neighbours they retrieve, then (when a component needs them) the reconstruction's features."""
        features = self.backbone(images)
        reconstruction = (self.reconstructor(images, stats, self.retrieval(features)) if needs_reconstruction
                          else images)
        rebuilt = self.backbone(reconstruction) if any(part.needs_rebuilt_features for part in self.parts) else []
        return SharedWork(images=images, reconstruction=reconstruction, stats=stats, features=features,
                          rebuilt_features=rebuilt)

    def component_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (component maps [B, K, S, S], one per ``self.components``, before
        any reference; reconstruction [B, C, S, S] in [0, 1], the images themselves when no component needs one)."""
        work = self.shared_work(images)
        return torch.cat([part(work) for part in self.parts], dim=1), work.reconstruction

    def referenced_components(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (component maps [B, K, S, S], each divided by its fitted reference,
        before any component scale; reconstruction [B, C, S, S])."""
        components, reconstruction = self.component_maps(images)
        return self.reference(components, images), reconstruction

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, C, S, S] in [0, 1] -> (anomaly_map [B, 1, S, S], pred_score [B],
        reconstruction [B, C, S, S] in [0, 1])."""
        det = self.cfg.detect
        components, reconstruction = self.referenced_components(images)
        amap = self.fusion(components)
        return amap, image_score(amap, det.score, det.topk), reconstruction

    def reset_fitted_state(self) -> None:
        """Forget everything fitted from good images (component states, references, scales)."""
        for part in self.parts:
            part.reset()
        if self.retrieval is not None:
            self.retrieval.reset()
        self.reference.reset()
        self.fusion.reset()

    def fitted_state(self) -> dict[str, Any]:
        """Everything fitted from good images, on the CPU, keyed as in the bundle (``FITTED_KEYS``; each None when
        not fitted or not used), with the identity {"name", "sha256"} of the backbone it was computed with."""
        state: dict[str, Any] = dict.fromkeys(FITTED_KEYS)
        state.update(self.reference.fitted_state())
        state["component_scale"] = self.fusion.fitted_state()
        for part in self.parts:
            if part.state_key is not None:
                state[part.state_key] = part.fitted_state()
        state["backbone"] = None if self.backbone is None else backbone_identity(self.cfg.backbone)
        state["retrieval"] = None if self.retrieval is None else self.retrieval.fitted_state()
        return state

    def load_fitted_state(self, state: Mapping[str, Any]) -> None:
        """Use the fitted states of a bundle (keys of ``FITTED_KEYS``; None or absent = not fitted)."""
        if state.get("component_scale") is not None:
            self.fusion.load_fitted_state(state["component_scale"])
        self.reference.load_fitted_state(state.get("map_reference"), state.get("reference_bank"))
        if self.retrieval is not None and state.get("retrieval") is not None:
            self.retrieval.load_fitted_state(state["retrieval"])
        for part in self.parts:
            if part.state_key is not None and state.get(part.state_key) is not None:
                part.load_fitted_state(state[part.state_key])

    @classmethod
    def from_config(cls, cfg: Config, state_dict: dict[str, Tensor] | None = None,
                    head_state_dict: dict[str, Tensor] | None = None, backbone_sha256: str | None = None,
                    adapted_backbone: dict[str, Tensor] | None = None) -> "Detector":
        """Detector with a fresh UNet built from cfg, loading `state_dict` (UNet weights) when given, a scoring
        head loaded from `head_state_dict` when given and cfg.detect.scorer uses it, the frozen backbone of
        cfg.backbone when the retrieval or a component other than an adapted feature_residual needs it (refused
        when its weights' SHA-256 is not `backbone_sha256`), and a copy of it with the weights `adapted_backbone`
        when given and the scorer has feature_residual."""
        unet = build_unet(cfg)
        if state_dict is not None:
            unet.load_state_dict(state_dict)
        components = scorer_components(cfg.detect.scorer, head_state_dict is not None)
        head = None
        if head_state_dict is not None and "head" in components:
            head = build_head(cfg)
            head.load_state_dict(head_state_dict)
        adapted = None
        if adapted_backbone is not None and "feature_residual" in components:
            adapted = FeatureExtractor(cfg.backbone)
            adapted.load_adapted(adapted_backbone)
        frozen_users = [name for name in components if name.startswith("feature_")
                        and not (name == "feature_residual" and adapted is not None)]
        retrieves = cfg.model.condition == "retrieval"
        backbone = build_backbone(cfg.backbone, backbone_sha256) if frozen_users or retrieves else None
        return cls(unet, GaussianDiffusion.from_config(cfg.diffusion), cfg, head, backbone, adapted)

    @classmethod
    def from_bundle(cls, bundle: Any, device: torch.device | str = "cpu", **detect_overrides: Any) -> "Detector":
        """Detector in eval mode on `device` from a loaded bundle (.cfg, .state_dict = EMA UNet weights, optional
        .head_state_dict and .adapted_backbone, and the fitted states of ``FITTED_KEYS``, used only when .threshold
        was calibrated with the detection settings and components now in use; .backbone {"name", "sha256"}: the backbone weights it was
        calibrated with, refused when the installed ones differ).

        detect_overrides replace cfg.detect fields (None values keep the bundle's).
        """
        cfg = bundle.cfg.override("detect", **detect_overrides).validate()
        head_state = getattr(bundle, "head_state_dict", None)
        identity = getattr(bundle, "backbone", None) or {}
        try:
            detector = cls.from_config(cfg, bundle.state_dict, head_state, identity.get("sha256"),
                                       getattr(bundle, "adapted_backbone", None))
        except RuntimeError as err:  # load_state_dict: missing or unexpected keys, wrong shapes
            first = str(err).strip().splitlines()
            raise ValueError(f"{getattr(bundle, 'path', 'the bundle')}: its weights do not fit its config "
                             f"({' '.join(first[:2])[:300]}); the file was altered or mixes two models") from err
        if calibrated_for(getattr(bundle, "threshold", None), detector):  # fitted states belong to their calibration
            detector.load_fitted_state({key: getattr(bundle, key, None) for key in FITTED_KEYS if key != "backbone"})
        return detector.to(device).eval()
