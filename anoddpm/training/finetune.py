"""`anoddpm train --init BASE_MODEL_PT`: start the denoiser from another bundle and fine-tune it, DreamBooth-style.

The base bundle (another product's, or a base model trained on many products or on `anoddpm synth` textures) must
see images as this run does: the same channels, model input side, UNet architecture and backbone; otherwise one
line names `--init` and what differs. Its EMA weights start both the trained weights and their EMA.

Prior preservation (Ruiz et al. 2023): before the first step the base model makes its own samples, partial-diffusion
variations of the run's good images (``variations.diffusion_variations``); ``train.prior_fraction`` of every epoch
of the training stream is those samples, the rest the good images, so a few shots do not pull the weights onto
five pictures.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from anoddpm.bundle import load_bundle
from anoddpm.config import Config
from anoddpm.data.datasets import ImageDataset
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.training.variations import diffusion_variations

log = logging.getLogger(__name__)
_ARCHITECTURE = ("preset", "base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "num_heads")


def base_weights(cfg: Config, init: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of the base bundle at `init`, checked against `cfg` (ValueError naming --init)."""
    path = Path(init)
    if not path.is_file():
        raise FileNotFoundError(f"--init {path}: no such base bundle (give the model.pt of a trained run)")
    try:
        base = load_bundle(path, drop_bad_calibration=True)
    except ValueError as err:
        raise ValueError(f"--init {path}: {err}") from err
    theirs, ours = base.cfg, cfg
    differences = [f"{name} {a} (base) vs {b}" for name, a, b in (
        ("channels", theirs.data.channels, ours.data.channels),
        ("model input side", theirs.data.input_side, ours.data.input_side),
        ("backbone", theirs.backbone.name, ours.backbone.name),
        ("intensity", theirs.data.intensity, ours.data.intensity),
        *((f"model.{k}", getattr(theirs.model, k), getattr(ours.model, k)) for k in _ARCHITECTURE)) if a != b]
    if differences:
        raise ValueError(f"--init {path} does not fit this run: {'; '.join(differences)} (train with the base's "
                         "settings, e.g. --channels / --image-size / --preset, or choose another base)")
    return base.state_dict


def with_prior_samples(cfg: Config, train_ds: ImageDataset, model: torch.nn.Module, diffusion: GaussianDiffusion,
                       device: torch.device) -> ImageDataset:
    """`train_ds` with the base model's own samples mixed in: each image repeated ``data.variations`` times plus
    that many variations of it, so ``train.prior_fraction`` of the stream is prior samples (0: `train_ds` as is)."""
    fraction, per_image = cfg.train.prior_fraction, max(1, cfg.data.variations)
    if fraction <= 0 or len(train_ds) == 0:
        return train_ds
    shots = [np.asarray(a, np.float32) for a in train_ds.arrays]
    samples = diffusion_variations(model, diffusion, cfg, shots, per_image, cfg.train.seed, device)
    repeats = max(1, round(per_image * (1 - fraction) / fraction))
    arrays = [a for a in shots for _ in range(repeats)] + [v for vs in samples for v in vs]
    names = [n for n in train_ds.names for _ in range(repeats)] + [f"{n}#prior{j}" for n, vs in
                                                                   zip(train_ds.names, samples) for j in range(len(vs))]
    log.info("prior preservation: %d base-model samples mixed with %d x %d good images", len(arrays) - len(shots) *
             repeats, len(shots), repeats)
    return ImageDataset(arrays, names, augment=cfg.data.augment, seed=cfg.train.seed)

