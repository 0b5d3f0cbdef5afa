"""K-shot calibration: the threshold of a model trained on K good images (``data.shots``), by leave-one-out.

A K-shot model holds no good image back, so the threshold's good scores come from folds: for each shot i, the
feature_memory bank and the map reference (``calibration.fit_and_score_good``) are fitted on the other shots and the
images derived from them (``derived``: augmentations of each shot), and shot i alone is scored. Component scales
(fusion max) are the median good-image maximum of each component map, which needs images outside the bank (an image
in the feature memory is at distance 0 from it): each fold's scales come from the maxima the *other* folds' left-out
images reached. The K scores (and maps) give the threshold at ``detect.threshold_quantile``; the states stored in the
bundle are then fitted on all shots and all derived images, with scales from every left-out image's maxima. With one
shot and derived images, the folds leave out one derived image at a time instead (scored against the shot and the
other derived images); one shot and nothing derived cannot be left out and is refused.

Every fold fits on one image fewer than the final states, so the scores are, if anything, a little high: the
threshold errs towards fewer false alarms. With fewer than MIN_REFERENCE_IMAGES images a map reference stays unfitted
(with a warning), as in ``calibration``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from anoddpm.bundle import load_bundle
from anoddpm.data.datasets import stack_if_same
from anoddpm.detection.calibration import data_record, fit_and_score_good, store_calibration
from anoddpm.detection.detector import Detector
from anoddpm.detection.requantile import good_cache
from anoddpm.detection.scoring_loop import score_component_maps
from anoddpm.detection.tiling import inspection_detector
from eval.threshold import MIN_REFERENCE_IMAGES, calibrate

log = logging.getLogger(__name__)

Image = np.ndarray | Tensor  # float [C, S, S] in [0, 1] ([C, H, W] tiled)


def check_folds(n_shots: int, n_derived: int) -> None:
    """ValueError when `n_shots` shots with `n_derived` derived images in all cannot be calibrated leave-one-out."""
    if n_shots == 1 and n_derived == 0:
        raise ValueError("--shots 1: leave-one-out calibration needs at least 2 good images; give --shots 2 or more "
                         "or add --augment diffusion")


def leave_one_out_folds(shots: Sequence[Image],
                        derived: Sequence[Sequence[Image]]) -> list[tuple[list[Image], list[Image]]]:
    """[(images the fold's states are fitted on, the image it scores)]: one fold per shot (K >= 2; a shot's derived
    images leave with it), or per derived image of a single shot."""
    check_folds(len(shots), sum(len(d) for d in derived))
    if len(shots) == 1:
        extra = list(derived[0])
        return [([shots[0], *extra[:j], *extra[j + 1:]], [extra[j]]) for j in range(len(extra))]
    return [([image for j in range(len(shots)) if j != i for image in (shots[j], *derived[j])], [shots[i]])
            for i in range(len(shots))]


def _as_array(image: Image) -> np.ndarray:
    return np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)


def _fit_fold(view: Any, fitted_on: list[np.ndarray], left_out: list[np.ndarray], device: torch.device,
              batch_size: int, with_reference: bool) -> None:
    """Fit every state of the view's detector on `fitted_on` alone (component scales: see ``_fit_scales``); the map
    reference is forgotten again unless `with_reference`."""
    det = view.detector.cfg.detect
    good_mean_on_good = det.map_reference == "good_mean" and not view.fits_good_mean_on_training
    # fit_and_score_good fits good_mean (whole images) and the scales on its good images: the fold's own images for
    # good_mean, else the left-out image, whose scales _fit_scales replaces before anything is scored with them
    fit_and_score_good(view, fitted_on if good_mean_on_good else left_out, device, batch_size, bank_images=fitted_on)
    if not with_reference:
        view.detector.reference.reset()


def _reference_in_every_fold(view: Any, folds: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> bool:
    """Whether every fold has the model inputs a map reference needs (MIN_REFERENCE_IMAGES): the final states get
    one only then, or the stored threshold (from the folds' unreferenced maps) would be in other units than the maps
    the bundle makes."""
    smallest = min(len(view.model_inputs(fitted_on)) for fitted_on, _ in folds)
    if smallest < MIN_REFERENCE_IMAGES and view.detector.cfg.detect.map_reference != "none":
        log.warning("map reference: not fitted, the leave-one-out folds hold %d model inputs, fewer than %d; maps stay "
                    "unnormalised (the threshold comes from the folds)", smallest, MIN_REFERENCE_IMAGES)
    return smallest >= MIN_REFERENCE_IMAGES


def _referenced_maxima(view: Any, images: list[np.ndarray], device: torch.device, batch_size: int) -> np.ndarray | None:
    """Per model input (image or tile) maxima [N, K] of the referenced component maps; None without component scales."""
    if not view.detector.fusion.scales_components:
        return None
    maxima, _ = score_component_maps(view.detector, view.model_inputs(images), device, batch_size,
                                     reduce=lambda c: c.amax(dim=(2, 3)), referenced=True)
    return maxima


def _fit_scales(view: Any, maxima: list[np.ndarray | None]) -> None:
    """Component scales from maxima of left-out images only: an image in the feature memory's bank is at distance 0
    from it, so scales fitted on the bank's own images would blow the feature_memory map up."""
    if view.detector.fusion.scales_components:
        view.detector.fusion.fit(np.concatenate(maxima))


def calibrate_shots(bundle_path: str | Path, shots: Sequence[Image], device: torch.device,
                    derived: Sequence[Sequence[Image]] | None = None, overrides: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None, few_shot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate the bundle at `bundle_path` leave-one-out on `shots` (float [C, S, S] in [0, 1]) and `derived`
    (derived[i]: extra good images made from shot i; None = none) and store the threshold and the states fitted on
    all of them in it -> the threshold dict (calibrate_bundle's keys, plus ``shots`` K and ``leave_one_out`` True).
    `overrides`: detection settings replacing the bundle's; `data`: the data record of the shots' folder
    (``calibration.data_record``; default: the bundle's training data); `few_shot`: {"shots", "shots_seed",
    "shot_files"} of shots drawn for a model trained on other images (`anoddpm calibrate --shots`), stored as
    threshold["few_shot"]. ValueError when there is nothing to leave out or a score is not a finite number."""
    shots = [_as_array(s) for s in shots]
    derived = [[_as_array(d) for d in group] for group in (derived or [[] for _ in shots])]
    if len(derived) != len(shots):
        raise ValueError(f"derived images come in {len(derived)} group(s) for {len(shots)} shot(s); give one per shot")
    folds = leave_one_out_folds(shots, derived)
    bundle = load_bundle(bundle_path, map_location=device, drop_bad_calibration=True)  # replaced here
    batch_size = bundle.cfg.train.batch_size
    view = inspection_detector(Detector.from_bundle(bundle, device, **(overrides or {})).eval(), batch_size)
    cfg = view.detector.cfg
    states, maxima = [], []
    with_reference = _reference_in_every_fold(view, folds)
    for fitted_on, left_out in folds:
        _fit_fold(view, fitted_on, left_out, device, batch_size, with_reference)
        states.append(view.detector.fitted_state())
        maxima.append(_referenced_maxima(view, left_out, device, batch_size))
    scores: list[float] = []
    maps: list[np.ndarray] = []
    for i, (_, left_out) in enumerate(folds):
        view.detector.reset_fitted_state()
        view.detector.load_fitted_state(states[i])
        _fit_scales(view, [m for j, m in enumerate(maxima) if j != i])
        scored = view.score_set(left_out, device)
        scores.extend(float(s) for s in scored.scores)
        maps.extend(np.asarray(m, dtype=np.float32) for m in scored.maps)
        log.info("leave-one-out fold %d/%d: score %.6g", i + 1, len(folds), scores[-1])
    bad = [i for i, s in enumerate(scores) if not np.isfinite(s)]
    if bad or not all(np.isfinite(m).all() for m in maps):
        raise ValueError(f"{bundle_path}: leave-one-out scores or maps of fold(s) {bad or 'some'} are not finite "
                         "numbers; no threshold was stored: retrain (e.g. with a lower --lr)")
    everything = [image for i, shot in enumerate(shots) for image in (shot, *derived[i])]
    _fit_fold(view, everything, shots[:1], device, batch_size, with_reference)
    _fit_scales(view, maxima)  # the final scales: every left-out image's maxima
    good_maps = stack_if_same(maps)
    threshold = calibrate(np.asarray(scores), good_maps, quantile=cfg.detect.threshold_quantile)
    threshold["detect"] = cfg.to_dict()["detect"]
    threshold["components"] = list(view.detector.components)
    trained = bundle.fingerprint
    if data is not None:
        threshold["data"] = dict(data)
    elif trained.get("root"):  # as calibrate_bundle: ROOT/category, or ROOT itself when it is the category
        recorded = trained.get("category")
        category = recorded if recorded and (Path(trained["root"]) / recorded).is_dir() else None
        threshold["data"] = data_record(trained["root"], category, trained.get("kind"))
    record = threshold.get("data") or {}
    threshold["good_cache"] = good_cache(np.asarray(scores), good_maps, record.get("root"), record.get("category"))
    threshold.update(shots=len(shots), leave_one_out=True)
    if few_shot is not None:
        threshold["few_shot"] = dict(few_shot)
    store_calibration(bundle_path, threshold, view.detector)
    log.info("calibrated leave-one-out on %d shot(s) and %d derived image(s): image threshold %.6g", len(shots),
             len(everything) - len(shots), threshold["image"])
    return threshold
