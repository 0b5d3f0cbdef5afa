"""Datasets: image layouts (``anoddpm.data.layouts``) and NFBS brain MRI -> torch Datasets, val split, test samples.

Layouts accepted for ``--data ROOT [--category NAME]``: MVTec AD, MVTec LOCO, MVTec AD 2, VisA (as
distributed or converted), a folder of good images or named normal/abnormal/mask folders; see
``anoddpm.data.layouts``, which finds the files. This module reads them, and NFBS:

* **NFBS** (``ROOT/<ID>/sub-<ID>_ses-NFB3_T1w_brain.nii.gz`` with ``..._T1w_brainmask.nii.gz``
  beside it): training images are axial slices of the skull-stripped volume (RAS-canonical, anterior
  up), intensities clipped to the 0.5/99.5 percentiles of in-brain voxels and scaled to [0, 1];
  slices whose brain area is below ``MIN_SLICE_AREA`` of the volume's largest slice are skipped.
  The validation split holds back whole subjects. Anomalous brains for evaluation live in
  ``ROOT/anomalous/<ID>/<name>.nii.gz`` (skull-stripped T1w) with ``<name>_seg.nii.gz`` (lesion,
  > 0) and optionally ``<name>_brainmask.nii.gz`` (else brain = voxels > 0); each kept slice is a
  test sample, label 1 when it holds lesion voxels, else 0 (defect_type ``good``).

All images go through ``imageio.model_image`` (``preprocess``, or ``rescale`` when tiling; the one used at
scoring, export and runtime).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from anoddpm.platform.progress import progress

from anoddpm.config import Config
from anoddpm.data.imageio import (IMAGE_SUFFIXES, image_hw, load_model_image, model_image, model_mask, read_image, read_mask,
                             scaled_hw)
from anoddpm.data.layouts import Layout, TestItem, discover, resolve_category_root
from anoddpm.data.shots import draw_shots

MIN_SLICE_AREA = 0.3  # NFBS: keep axial slices with at least this share of the largest brain area
NFBS_BRAIN = "_T1w_brain.nii.gz"
NFBS_MASK = "_T1w_brainmask.nii.gz"


@dataclass(frozen=True)
class TestSample:
    """One labelled test image; ``image`` float32 [C, S, S] in [0, 1] and ``mask`` bool [S, S] load on access
    (tiling: [C, h, w] and [h, w], the image's size scaled by data.tile_scale)."""

    path: Path
    defect_type: str  # "good" or the defect type
    mask_path: Path | None
    label: int  # 0 good, 1 defective
    name: str  # unique, e.g. "crack/003"
    has_mask: bool  # False for a defect image without a mask (image label only): pixel metrics skip it
    _image: Callable[[], np.ndarray] = field(repr=False, compare=False)
    _mask: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        """float32 [C, S, S] in [0, 1]."""
        return self._image()

    @property
    def mask(self) -> np.ndarray:
        """bool [S, S]; all False for good samples."""
        return self._mask()


class ImageDataset(Dataset):
    """In-memory preprocessed images -> float32 tensors [C, S, S] in [0, 1], optionally augmented."""

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str], augment: str = "none", seed: int = 0):
        self.arrays, self.names = list(arrays), list(names)
        self.transform = None
        if augment in ("flips", "texture"):
            import albumentations as A

            # one draw per image picks the whole symmetry: separate random flips in one seeded Compose draw the
            # same number, so they would only ever give the identity or the 180-degree turn
            if augment == "texture":
                symmetry = A.D4(p=1.0)  # the 8 flips and quarter turns of a square
            else:
                symmetry = A.OneOf([A.NoOp(), A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0),
                                    A.Sequential([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)])], p=1.0)
            self.transform = A.Compose([symmetry], seed=seed)
        elif augment not in ("none", "diffusion"):  # diffusion: variations made once (anoddpm.training.variations)
            raise ValueError(f"data.augment={augment!r} is not allowed; choose none, flips, texture or diffusion")

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> torch.Tensor:
        arr = self.arrays[index].astype(np.float32)
        if self.transform is not None:
            arr = self.transform(image=arr.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


def is_nfbs(root: Path) -> bool:
    """True when ``root`` holds NFBS subject folders (``<ID>/sub-*_T1w_brain.nii.gz``)."""
    return root.is_dir() and next(root.glob(f"*/sub-*{NFBS_BRAIN}"), None) is not None


def _nfbs_root(cfg: Config, root: str | Path, category: str | None) -> Path | None:
    """The NFBS folder ROOT (+ category) names, or None for an image layout."""
    d = cfg.data
    if d.normal_dir or d.abnormal_dir:
        return None
    cat_root = resolve_category_root(root, category)
    return cat_root if is_nfbs(cat_root) else None


def image_layout(cfg: Config, root: str | Path, category: str | None, with_test: bool = True) -> Layout:
    """The image layout of ROOT (+ category) with cfg.data's folder names (``anoddpm.data.layouts.discover``)."""
    d = cfg.data
    return discover(root, category, d.normal_dir, d.abnormal_dir, d.mask_dir, d.normal_test_dir, with_test)


def infer_channels(root: str | Path, category: str | None, cfg: Config | None = None) -> int:
    """3 when the first training image has colour, else 1 (NFBS volumes are grey); cfg gives folder names."""
    cfg = cfg or Config()
    if _nfbs_root(cfg, root, category) is not None:
        return 1
    files = image_layout(cfg, root, category, with_test=False).train
    if not files:
        raise ValueError(f"{root} holds no training images ({', '.join(IMAGE_SUFFIXES)})")
    rgb = read_image(files[0], channels=3)
    grey = np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 0], rgb[..., 2])
    return 1 if grey else 3


def _n_val(n: int, cfg: Config) -> int:
    if cfg.data.val_fraction <= 0 or n < 2:
        return 0
    return min(max(round(cfg.data.val_fraction * n), cfg.data.min_val_images), n // 2)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(cat_root: Path, files: Sequence[Path]) -> str:
    """sha256 over sorted (relative path, file sha256): stable across machines and copies. A name that is not
    UTF-8 is hashed as its bytes (surrogateescape), so such files train like any other."""
    h = hashlib.sha256()
    for rel, path in sorted((p.relative_to(cat_root).as_posix(), p) for p in files):
        h.update(f"{rel}\t{_sha256(path)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@lru_cache(maxsize=2)
def _load_volume(path: Path, brain_mask: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI -> (normalised volume float32 [X, Y, Z] in [0, 1], brain bool [X, Y, Z]), RAS canonical."""
    import nibabel as nib

    vol = np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32))
    if brain_mask is not None and brain_mask.is_file():
        brain = np.asarray(nib.as_closest_canonical(nib.load(brain_mask)).dataobj) > 0
        if brain.shape != vol.shape:
            raise ValueError(f"brain mask {brain_mask} has shape {brain.shape} but volume {path} has {vol.shape}")
    else:
        brain = vol > 0
    if vol.ndim != 3 or not brain.any():
        raise ValueError(f"{path} must be a 3-D volume with brain voxels, got shape {vol.shape}")
    lo, hi = np.percentile(vol[brain], [0.5, 99.5])
    vol = np.where(brain, (np.clip(vol, lo, hi) - lo) / max(hi - lo, 1e-6), 0.0).astype(np.float32)
    return vol, brain


def _kept_slices(brain: np.ndarray) -> list[int]:
    area = brain.sum(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(area >= MIN_SLICE_AREA * area.max())]


def _axial(vol: np.ndarray, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(vol[:, :, k]))  # [Y, X], anterior up


def _nfbs_slices(brain_file: Path, cfg: Config) -> list[np.ndarray]:
    vol, brain = _load_volume(brain_file, brain_file.with_name(brain_file.name.replace(NFBS_BRAIN, NFBS_MASK)))
    out = []
    for k in _kept_slices(brain):
        img = _model_image(_axial(vol, k), cfg)
        out.append(np.repeat(img, cfg.data.channels, axis=0).astype(np.float16))  # float16: many slices
    return out


def _split(files: list[Path], validation: list[Path], cfg: Config, seed: int) -> tuple[list[Path], list[Path]]:
    """(training files, held-back validation files): a layout's own validation split, else
    ``cfg.data.val_fraction`` of `files` chosen by `seed`."""
    if validation:
        return files, validation
    order = np.random.default_rng(seed).permutation(len(files))
    val_idx = set(order[:_n_val(len(files), cfg)].tolist())
    return ([f for i, f in enumerate(files) if i not in val_idx], [f for i, f in enumerate(files) if i in val_idx])


def training_files(cfg: Config, root: str | Path, category: str | None) -> tuple[str, Path, list[Path], list[Path]]:
    """(layout kind, category folder, good training files (NFBS: volumes), the layout's own validation files)."""
    nfbs = _nfbs_root(cfg, root, category)
    if nfbs is not None:
        return "nfbs", nfbs, sorted(nfbs.glob(f"*/sub-*{NFBS_BRAIN}")), []
    layout = image_layout(cfg, root, category, with_test=False)
    return layout.kind, layout.root, layout.train, layout.validation


def load_training_data(cfg: Config, root: str | Path, category: str | None,
                       seed: int) -> tuple[ImageDataset, ImageDataset, dict]:
    """-> (train_ds, val_ds without augmentation, fingerprint); items float32 [C, S, S] in [0, 1].

    The validation split is the layout's ``validation/good`` folder when it has one; else it holds back
    ``cfg.data.val_fraction`` of the good images (at least ``cfg.data.min_val_images`` when there are
    twice as many; whole subjects for NFBS), chosen by ``seed``, for threshold calibration. A K-shot config
    (``data.shots`` K >= 1) trains on K of the good files drawn with ``data.shots_seed`` (``anoddpm.data.shots``) and
    holds none back (val_ds is empty); its fingerprint adds ``shots``, ``shots_seed`` and ``shot_files``.
    """
    kind, cat_root, files, validation = training_files(cfg, root, category)
    if not files:
        raise ValueError(f"no training images found under {cat_root}")
    shots = cfg.data.shots
    if shots:
        train_files, val_files = draw_shots(files, shots, cfg.data.shots_seed, cat_root), []
    else:
        train_files, val_files = _split(files, validation, cfg, seed)
    splits: dict[bool, tuple[list[np.ndarray], list[str]]] = {False: ([], []), True: ([], [])}
    d = cfg.data
    for held_back, group in ((False, train_files), (True, val_files)):
        arrays, names = splits[held_back]
        for path in group:
            name = path.relative_to(cat_root).as_posix()
            if kind == "nfbs":
                slices = _nfbs_slices(path, cfg)
                arrays.extend(slices)
                names.extend(f"{name}#{k}" for k in range(len(slices)))
            else:
                arrays.append(load_model_image(path, d.channels, d.image_size, d.resize_policy, d.tile_size,
                                               d.tile_scale))
                names.append(name)
    hashed = [*files, *validation]
    if kind == "nfbs":
        hashed += [m for f in files if (m := f.with_name(f.name.replace(NFBS_BRAIN, NFBS_MASK))).is_file()]
    train_ds = ImageDataset(*splits[False], augment=cfg.data.augment, seed=seed)
    val_ds = ImageDataset(*splits[True])
    fingerprint = {
        "root": str(Path(root).resolve()),
        "category": category or cat_root.name,
        "kind": kind,
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "n_files": len(hashed) if kind != "nfbs" else len(files),
        "val_files": sorted(f.relative_to(cat_root).as_posix() for f in val_files),
        "seed": seed,
        "sha256": _fingerprint(cat_root, hashed),
    }
    if shots:  # only then: fingerprints of other runs (and the checkpoints that hold them) stay as they were
        fingerprint.update(shots=shots, shots_seed=cfg.data.shots_seed,
                           shot_files=[f.relative_to(cat_root).as_posix() for f in train_files])
    return train_ds, val_ds, fingerprint


def _model_image(image: np.ndarray, cfg: Config) -> np.ndarray:
    d = cfg.data
    return model_image(image, d.image_size, d.resize_policy, d.tile_size, d.tile_scale)


def _model_mask(mask: np.ndarray, cfg: Config) -> np.ndarray:
    d = cfg.data
    return model_mask(mask, d.image_size, d.resize_policy, d.tile_size, d.tile_scale)


def _mask_or_empty(masks: tuple[Path, ...] | None, image: Path, cfg: Config, rule: str) -> np.ndarray:
    """The union of `masks` (none: all False) with the model's geometry."""
    full = None
    for path in masks or ():
        mask = read_mask(path, nonzero=rule == "nonzero")
        full = mask if full is None else full | mask
    if full is not None:
        return _model_mask(full, cfg)
    d = cfg.data
    return np.zeros(scaled_hw(*image_hw(image), d.tile_scale) if d.tile_size else (d.image_size, d.image_size), bool)


def _image_sample(item: TestItem, cfg: Config, rule: str) -> TestSample:
    d = cfg.data
    return TestSample(path=item.image, defect_type=item.defect_type, mask_path=item.masks[0] if item.masks else None,
                      label=item.label, name=item.name, has_mask=item.masks is not None,
                      _image=partial(load_model_image, item.image, d.channels, d.image_size, d.resize_policy,
                                     d.tile_size, d.tile_scale),
                      _mask=partial(_mask_or_empty, item.masks, item.image, cfg, rule))


def _anomalous_volumes(cat_root: Path) -> list[tuple[Path, Path, Path]]:
    """ROOT/anomalous/<ID>/<name>.nii.gz -> [(volume, lesion seg, brain mask (may not exist))]."""
    out = []
    for vol in sorted((cat_root / "anomalous").glob("*/*.nii.gz")):
        stem = vol.name[: -len(".nii.gz")]
        if stem.endswith(("_seg", "_brainmask")):
            continue
        seg = vol.with_name(f"{stem}_seg.nii.gz")
        if not seg.is_file():
            raise FileNotFoundError(f"lesion mask {seg} for anomalous volume {vol} not found")
        out.append((vol, seg, vol.with_name(f"{stem}_brainmask.nii.gz")))
    return out


def _volume_slice(vol: Path, brain_mask: Path, k: int, cfg: Config) -> np.ndarray:
    img = _model_image(_axial(_load_volume(vol, brain_mask)[0], k), cfg)
    return np.repeat(img, cfg.data.channels, axis=0)


def _nfbs_test_set(cat_root: Path, cfg: Config) -> list[TestSample]:
    import nibabel as nib

    samples = []
    for vol_path, seg_path, mask_path in _anomalous_volumes(cat_root):
        _, brain = _load_volume(vol_path, mask_path)
        lesion = np.asarray(nib.as_closest_canonical(nib.load(seg_path)).dataobj) > 0
        if lesion.shape != brain.shape:
            raise ValueError(f"lesion mask {seg_path} has shape {lesion.shape} but volume {vol_path} has {brain.shape}")
        for k in _kept_slices(brain):
            seg_k = _axial(lesion, k)
            label = int(seg_k.any())
            samples.append(TestSample(
                path=vol_path, defect_type="lesion" if label else "good", mask_path=seg_path if label else None,
                label=label, name=f"{vol_path.parent.name}/{vol_path.name[:-len('.nii.gz')]}_z{k:03d}", has_mask=True,
                _image=partial(_volume_slice, vol_path, mask_path, k, cfg),
                _mask=partial(_model_mask, seg_k, cfg)))
    return samples


def load_test_set(cfg: Config, root: str | Path, category: str | None) -> list[TestSample]:
    """Labelled test samples (lazy: pixels load on access); [] for a plain image folder.

    A folder layout with defect images but no ``data.normal_test_dir`` takes its test goods from the
    held-back validation split (seed ``cfg.train.seed``, as in training), less a K-shot model's shots.
    """
    nfbs = _nfbs_root(cfg, root, category)
    if nfbs is not None:
        return _nfbs_test_set(nfbs, cfg)
    layout = image_layout(cfg, root, category)
    items = list(layout.test)
    if layout.kind == "folder" and items and not cfg.data.normal_test_dir:
        _, val_files = _split(layout.train, [], cfg, cfg.train.seed)
        if cfg.data.shots:  # a K-shot model's shots are training images, never test images
            shots = set(draw_shots(layout.train, cfg.data.shots, cfg.data.shots_seed, layout.root))
            val_files = [p for p in val_files if p not in shots]
        items = [TestItem(p, "good", (), f"good/{p.relative_to(layout.root).with_suffix('').as_posix()}")
                 for p in val_files] + items
    return [_image_sample(item, cfg, layout.mask_rule) for item in items]


def stack_if_same(arrays: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One stacked array when every array has the same shape, else the list itself (native sizes differ)."""
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else list(arrays)


def labelled_test_arrays(cfg: Config, root: Path, category: str | None) -> dict[str, Any]:
    """The labelled test set as arrays: images [N,C,S,S], masks [N,S,S] bool, labels [N], types, paths
    (tiled at native resolution: lists of [C,H_i,W_i] and [H_i,W_i] when the sizes differ)."""
    samples = load_test_set(cfg, root, category)
    if len(samples) == 0:
        raise ValueError(f"no test images under {root} (category {category})")
    items = [samples[i] for i in range(len(samples))]
    loaded = [(np.asarray(s.image, dtype=np.float32), np.asarray(s.mask, dtype=bool))
              for s in progress(items, desc="load test set", unit="img")]
    return {
        "images": stack_if_same([image for image, _ in loaded]),
        "masks": stack_if_same([mask for _, mask in loaded]),
        "labels": np.array([int(s.label) for s in items], dtype=np.int64),
        "defect_types": [str(s.defect_type) for s in items],
        "paths": [str(s.path) for s in items],
        "names": [s.name for s in items],  # unique even where paths repeat (NFBS slices of one volume)
        "has_mask": np.array([bool(s.has_mask) for s in items], dtype=bool),
    }
