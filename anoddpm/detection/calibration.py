"""One calibration: everything a detector needs from good images, fitted in order, and the threshold.

``fit_and_score_good`` fits, on the training split (``bank_images``), the retrieval database of a conditioned model,
each component's state (the feature_memory bank), then the map reference of ``detect.map_reference`` (nearest_good bank; good_mean), then the component scales
of ``detect.fusion`` max on the held-back good images, and returns the held-back images' scores: the threshold's
good-score distribution, unbiased because those images are in no fitted state. ``calibrate_threshold`` turns them
into the threshold dict; ``calibrate_bundle`` and ``anoddpm calibrate`` store both in the bundle.

It works on an inspection view (``tiling.inspection_detector``): whole images, or tiles (``tiling.TiledDetector``),
whose ``model_inputs`` are the grid tiles, so every state is fitted on what the model sees. A view whose maps are
stitched (``fits_good_mean_on_training``) fits good_mean on training inputs; whole images fit it on the held-back
images, each scored against the reference of the others (leave-one-out), so it stays unbiased.

`train` ends with ``calibrate_bundle``; `calibrate`, `evaluate`, `score`, `export`, the Python API and the settings
guard (``guard``) all come here.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from anoddpm.bundle import load_bundle, update_threshold
from anoddpm.data.datasets import is_nfbs, labelled_test_arrays, load_training_data
from anoddpm.data.layouts import images_in
from anoddpm.detection.detector import Detector
from anoddpm.detection.fusion import combine_component_maps
from anoddpm.detection.maps import image_score
from anoddpm.detection.references import pool_bank_maps, thumbnail_features
from anoddpm.detection.requantile import good_cache
from anoddpm.detection.scoring_loop import ScoredSet, batched, score_component_maps
from anoddpm.detection.tiling import inspection_detector
from eval.threshold import MIN_REFERENCE_IMAGES, calibrate, held_out_normalised

log = logging.getLogger(__name__)
BANK_MAX_IMAGES = 1000  # larger training splits (NFBS slices) give an evenly spaced subset: bounded time and size


def training_root(bundle: Any, data: str | Path | None, category: str | None) -> tuple[Path, str | None]:
    """(data root, category) to calibrate on: `data` when given, else the data of the bundle's latest calibration
    (threshold["data"], ``data_record``), else its recorded training root. A recorded root is refused (ValueError)
    when it is a filesystem root or no longer holds the layout it was recorded with: it is never searched."""
    if data is not None:
        return Path(data), category
    threshold = bundle.threshold if isinstance(bundle.threshold, dict) else {}
    record, source = threshold.get("data"), "its latest calibration"
    if not record or not record.get("root"):
        record, source = bundle.fingerprint, "its training data"
        recorded = record.get("category")
        if category is None and recorded and record.get("root") and (Path(record["root"]) / recorded).is_dir():
            category = recorded  # ROOT/category layout; otherwise ROOT was the category or image folder itself
    elif category is None:
        category = record.get("category")
    if not record.get("root"):
        raise ValueError(f"{bundle.path} records no training data root; pass --data ROOT [--category NAME]")
    root = Path(record["root"])
    problem = _layout_problem(root, category, record.get("kind"), bundle.cfg)
    if problem is not None:
        raise ValueError(f"{bundle.path} records the data root {root} ({source}), which {problem}; pass --data ROOT "
                         "[--category NAME]")
    return root, category


def _layout_problem(root: Path, category: str | None, kind: str | None, cfg: Any) -> str | None:
    """Why a recorded data root is not searched for images (None: it may be): a filesystem root, or a folder
    without the recorded layout `kind` (an absent root is left to the caller: 'not here')."""
    resolved = root.resolve()
    if resolved == Path(resolved.anchor):
        return "is a filesystem root (never searched for images)"
    if not root.is_dir():
        return None
    folder = root / category if category and (root / category).is_dir() else root
    if cfg.data.normal_dir:
        expected = (folder / cfg.data.normal_dir).is_dir()
    elif kind in ("mvtec", "mvtec_loco", "mvtec_ad2"):
        expected = (folder / "train").is_dir()
    elif kind == "nfbs":
        expected = is_nfbs(folder)
    elif kind == "folder":  # images in the folder or one level down, as the layout recorded them
        expected = bool(images_in(folder)) or any(images_in(sub) for sub in folder.iterdir() if sub.is_dir())
    else:
        expected = True
    return None if expected else f"no longer holds the {kind} layout it was recorded with"


def data_record(root: str | Path, category: str | None, kind: str | None) -> dict[str, Any]:
    """threshold["data"]: the data root, category and layout kind a calibration was fitted on (the root later
    recalibrations use, ``training_root``)."""
    return {"root": str(Path(root).resolve()), "category": category, "kind": kind}


def fit_and_score_good(view: Any, good_images: Any, device: torch.device, batch_size: int,
                       bank_images: Any = None, keep: Mapping[str, Any] | None = None) -> ScoredSet:
    """Fit every state of ``view.detector`` and score the held-back good images [C, S, S] (or [C, H_i, W_i] tiled).

    In order: the retrieval database of a conditioned model (every reconstruction needs it) and each component's
    state on `bank_images` (the training split, [C, S, S] in [0, 1]; augmentation is not
    applied; at most BANK_MAX_IMAGES of them, evenly spaced); the nearest_good bank on them too (when at least
    MIN_REFERENCE_IMAGES); good_mean (see the module docstring); the component scales of fusion max on the good
    images' referenced maps. Fewer images than a reference needs leave it unfitted, with a warning. A component
    whose state is in `keep` (bundle key -> state, ``reusable_states``) uses it instead of fitting it again.
    """
    keep = keep or {}
    detector, det = view.detector, view.detector.cfg.detect
    detector.reset_fitted_state()
    bank = [] if bank_images is None else view.model_inputs(bank_images)
    chosen = _Chosen(bank, evenly_spaced(len(bank)))
    if detector.retrieval is not None:
        detector.retrieval.fit(chosen, detector.backbone, device, batch_size)
    for part in detector.parts:
        if part.state_key in keep:
            part.load_fitted_state(keep[part.state_key])
            log.info("calibration: the %s state is kept (its settings and training images are unchanged)", part.name)
        elif part.state_key is not None:
            part.fit(chosen, detector.backbone, device)
    if det.map_reference == "nearest_good":
        _fit_nearest_good(detector, chosen, device, batch_size)
    elif det.map_reference == "good_mean" and not view.fits_good_mean_on_training:
        return _fit_good_mean_held_out(detector, good_images, device, batch_size)
    elif det.map_reference == "good_mean":
        _fit_good_mean(detector, chosen, device, batch_size)
    if detector.fusion.scales_components:
        maxima, _ = score_component_maps(detector, view.model_inputs(good_images), device, batch_size,
                                         desc="component scale", reduce=lambda c: c.amax(dim=(2, 3)), referenced=True)
        detector.fusion.fit(maxima)
    return view.score_set(good_images, device, desc="validation")


def reusable_states(bundle: Any, detector: Detector, root: Path, category: str | None) -> dict[str, Any]:
    """The bundle's fitted component states that recalibrating `detector` on `root`/`category` would fit again
    unchanged: the bundle's calibration used the component, on the same data (threshold["data"]), with the same
    values of the component's ``fit_settings``. Bundle key -> state."""
    threshold = bundle.threshold if isinstance(bundle.threshold, dict) else {}
    record, stored = threshold.get("data") or {}, threshold.get("detect") or {}
    same_data = record.get("root") == data_record(root, category, None)["root"] and record.get("category") == category
    if not same_data:
        return {}
    current = asdict(detector.cfg.detect)
    kept = {}
    for part in detector.parts:
        state = getattr(bundle, part.state_key, None) if part.state_key else None
        if (state is not None and part.name in (threshold.get("components") or ())
                and all(stored.get(k) == current[k] for k in part.fit_settings)):
            kept[part.state_key] = state
    return kept


def evenly_spaced(n: int) -> np.ndarray:
    """Indices of at most BANK_MAX_IMAGES evenly spaced items out of `n` (a bank's images or tiles)."""
    return np.unique(np.linspace(0, n - 1, min(n, BANK_MAX_IMAGES)).round().astype(int))


def _fit_nearest_good(detector: Detector, images: Sequence[torch.Tensor], device: torch.device,
                      batch_size: int) -> None:
    """The nearest_good bank: thumbnails and pooled component maps of the chosen training images."""
    if not detector.reference.any_referenced:  # feature_memory alone: no map is divided by a reference
        return
    if len(images) < MIN_REFERENCE_IMAGES:
        log.warning("map reference: no nearest_good bank, %d training images are fewer than %d; maps stay "
                    "unnormalised", len(images), MIN_REFERENCE_IMAGES)
        return
    pooled, _ = score_component_maps(detector, images, device, batch_size, desc="reference bank", reduce=pool_bank_maps)
    features = torch.cat([thumbnail_features(torch.stack(chunk))
                          for chunk in batched((images[j] for j in range(len(images))), 256)])
    detector.reference.fit_nearest_good(features, torch.from_numpy(pooled))


def _fit_good_mean(detector: Detector, images: Sequence[torch.Tensor], device: torch.device, batch_size: int) -> None:
    """good_mean on the chosen training inputs (tiles): the mean of their component maps."""
    if len(images) < MIN_REFERENCE_IMAGES:
        log.warning("map reference: not fitted, %d training tiles are fewer than %d; maps stay unnormalised",
                    len(images), MIN_REFERENCE_IMAGES)
        return
    components, _ = score_component_maps(detector, [images[j] for j in range(len(images))], device, batch_size,
                                         desc="reference tiles")
    detector.reference.fit_good_mean(components)


def _fit_good_mean_held_out(detector: Detector, good_images: Any, device: torch.device, batch_size: int) -> ScoredSet:
    """good_mean on the held-back good images; each is scored over the reference of the others (leave-one-out),
    then the component scales; one reconstruction per image serves every component map."""
    components, seconds = score_component_maps(detector, good_images, device, batch_size, desc="validation")
    if len(components) < MIN_REFERENCE_IMAGES:
        log.warning("map reference: not fitted, %d held-back good images are fewer than %d; maps stay "
                    "unnormalised", len(components), MIN_REFERENCE_IMAGES)
    else:
        detector.reference.fit_good_mean(components)
        referenced = detector.reference.referenced.tolist()
        components = np.stack([held_out_normalised(components[:, k]) if referenced[k] else components[:, k]
                               for k in range(components.shape[1])], axis=1)
    if detector.fusion.scales_components:
        detector.fusion.fit(components.max(axis=(2, 3)))
        components = components / detector.fusion.component_scale.cpu().numpy()[None, :, None, None]
    det = detector.cfg.detect
    maps = combine_component_maps(torch.from_numpy(components), det.fusion)
    scores = image_score(maps, det.score, det.topk).double().numpy()
    return ScoredSet(scores=scores, maps=maps[:, 0].numpy(), reconstructions=None, seconds_per_image=seconds)


class _Chosen:
    """The chosen bank images as a lazy sequence of float32 [C, S, S] tensors: no copy of the whole set is held."""

    def __init__(self, dataset: Any, chosen: np.ndarray) -> None:
        self.arrays = getattr(dataset, "arrays", None)  # an ImageDataset: its stored images, without augmentation
        self.dataset, self.chosen = dataset, chosen

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, j: int) -> torch.Tensor:
        i = int(self.chosen[j])
        return torch.as_tensor(np.asarray(self.arrays[i] if self.arrays is not None else self.dataset[i],
                                          dtype=np.float32))


def score_validation(bundle: Any, view: Any, root: Path, category: str | None, device: torch.device,
                     batch_size: int) -> ScoredSet:
    """Fit every state on the bundle's training split under `root` and score its held-back good images (the same
    deterministic split as training)."""
    return _validation(bundle, view, root, category, device, batch_size)[0]


def _validation(bundle: Any, view: Any, root: Path, category: str | None, device: torch.device,
                batch_size: int) -> tuple[ScoredSet, dict[str, Any]]:
    """``score_validation`` and the fingerprint of the data it read (``load_training_data``)."""
    train_ds, val_ds, fingerprint = load_training_data(bundle.cfg, root, category, bundle.cfg.train.seed)
    if len(val_ds) == 0:
        raise ValueError(f"no held-back validation images under {root} (category {category}) to calibrate on")
    keep = reusable_states(bundle, view.detector, root, category)
    return fit_and_score_good(view, val_ds, device, batch_size, bank_images=train_ds, keep=keep), fingerprint


def calibrate_threshold(bundle: Any, view: Any, device: torch.device, batch_size: int, root: Path,
                        category: str | None, quantile: float, method: str) -> dict[str, Any]:
    """Threshold dict (image, pixel, method, quantile, n_good, detect, components, good_cache, data) from the
    validation split (+ the labelled test set for f1: this tunes on the test set, report metrics from another set)."""
    val, fingerprint = _validation(bundle, view, root, category, device, batch_size)
    good_scores, good_maps, defects = val.scores, val.maps, {}
    if method == "f1":
        test = labelled_test_arrays(bundle.cfg, root, category)
        if test["labels"].min() == 1 or test["labels"].max() == 0:
            raise ValueError(f"--method f1 needs good and defect test images under {root}; found only one kind")
        scored = view.score_set(test["images"], device, desc="test set")
        good, bad = test["labels"] == 0, test["labels"] == 1
        good_scores = np.r_[good_scores, scored.scores[good]]
        pick = lambda values, keep: [values[i] for i in np.flatnonzero(keep)]  # noqa: E731 - arrays or lists
        good_maps = [*good_maps, *pick(scored.maps, good)]
        defects = {"defect_scores": scored.scores[bad]}
        masked = bad & test["has_mask"]  # defects labelled without a mask say nothing about pixels
        if masked.any():
            defects.update(defect_maps=pick(scored.maps, masked), defect_masks=pick(test["masks"], masked))
    elif method != "quantile":
        raise ValueError(f"--method {method!r} is not allowed; choose quantile or f1")
    threshold = calibrate(good_scores, good_maps, quantile=quantile, **defects)
    threshold["detect"] = asdict(view.detector.cfg.detect)
    threshold["components"] = list(view.detector.components)
    threshold["good_cache"] = good_cache(val.scores, val.maps, root, category)  # a new quantile needs no model run
    threshold["data"] = data_record(root, category, fingerprint.get("kind"))
    return threshold


def store_calibration(path: str | Path, threshold: dict[str, Any], detector: Detector) -> Path:
    """Write `threshold` and the detector's fitted states (``Detector.fitted_state``) into the bundle at `path`."""
    return update_threshold(path, threshold, **detector.fitted_state())


def calibrate_bundle(bundle_path: str | Path, val_ds: Any, device: torch.device, train_ds: Any = None) -> dict[str, Any]:
    """Fit the bundle's Detector on train_ds, score the held-back good images val_ds and store the threshold and the
    fitted states in the bundle (the end of `train`)."""
    bundle = load_bundle(bundle_path, map_location=device)
    batch_size = bundle.cfg.train.batch_size
    view = inspection_detector(Detector.from_bundle(bundle, device).eval(), batch_size)
    scored = fit_and_score_good(view, val_ds, device, batch_size, bank_images=train_ds)
    threshold = calibrate(scored.scores, scored.maps, quantile=bundle.cfg.detect.threshold_quantile)
    threshold["detect"] = bundle.cfg.to_dict()["detect"]
    threshold["components"] = list(view.detector.components)
    threshold["good_cache"] = good_cache(scored.scores, scored.maps, bundle.fingerprint.get("root"),
                                         bundle.fingerprint.get("category"))
    trained = bundle.fingerprint
    if trained.get("root"):  # the data just trained on: ROOT/category, or ROOT itself when it is the category
        recorded = trained.get("category")
        category = recorded if recorded and (Path(trained["root"]) / recorded).is_dir() else None
        threshold["data"] = data_record(trained["root"], category, trained.get("kind"))
    store_calibration(bundle_path, threshold, view.detector)
    log.info("calibrated on %d held-back good images: image threshold %.6g", len(val_ds), threshold["image"])
    return threshold
