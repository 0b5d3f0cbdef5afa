"""Does a trained scoring head earn its place? Residual vs fused map on held-back synthetic anomalies.

A head that learned nothing adds its noise to the fused map (one marking random places costs the
fused map 0.08 image AUROC in tests/test_head_check.py); a head that learned finds defects the
residual misses (magnetic_tile, docs/quality.md, sessions 4-5). After
training, ``compare_scorers_on_synthetic`` puts synthetic anomalies (`anoddpm.data.anomalies`, drawn
with a fixed seed) on the held-back good images, which neither the denoiser nor the head saw, and
measures both scorers there; ``head_earns_its_place`` keeps the head when the fused map is at
least as good as the residual alone (mean of image and pixel AUROC).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from anoddpm.data.anomalies import synthesize_anomalies
from anoddpm.detection.detector import Detector
from anoddpm.detection.fusion import combine_component_maps
from anoddpm.detection.scoring_loop import score_component_maps
from eval.metrics import image_auroc, pixel_auroc
from anoddpm.detection.maps import image_score
from eval.threshold import MIN_REFERENCE_IMAGES, held_out_normalised, reference_map

MIN_CHECK_IMAGES = 4  # held-back good images needed for a verdict
MIN_ANOMALIES = 64  # synthetic anomalies scored at least (held-back images are reused with new draws)
CHECK_SEED = 20_221  # fixed, so the same bundle always gets the same verdict
TIE_TOLERANCE = 1e-3  # AUROC differences this small are float rounding, not a worse map


def compare_scorers_on_synthetic(detector: Detector, good_images: Sequence, device: torch.device,
                                 batch_size: int = 8, seed: int = CHECK_SEED) -> dict[str, Any]:
    """Image and pixel AUROC of the 'residual' and 'fused' maps: held-back good images [C, S, S] in [0, 1]
    against synthetic anomalies put on copies of them. `detector` must have the two components."""
    if detector.components != ("residual", "head"):
        raise ValueError(f"needs a detector with residual and head maps, got {detector.components}")
    good = torch.stack([torch.as_tensor(x) for x in good_images]).float()  # [N, C, S, S]
    repeats = math.ceil(MIN_ANOMALIES / len(good))
    generator = torch.Generator().manual_seed(seed)
    damaged, masks = synthesize_anomalies(good.repeat(repeats, 1, 1, 1), generator, clean_fraction=0.0)
    visible = masks.flatten(1).any(dim=1)
    damaged, masks = damaged[visible], masks[visible, 0].bool().numpy()  # [M, C, S, S], [M, S, S]
    good_maps, _ = score_component_maps(detector, good, device, batch_size)  # [N, 2, S, S], before any reference
    damaged_maps, _ = score_component_maps(detector, damaged, device, batch_size)  # [M, 2, S, S]
    if len(good) >= MIN_REFERENCE_IMAGES:  # the same per-component reference calibration fits
        reference = np.stack([reference_map(good_maps[:, k]) for k in range(2)])  # [2, S, S]
        damaged_maps = damaged_maps / reference[None]
        good_maps = np.stack([held_out_normalised(good_maps[:, k]) for k in range(2)], axis=1)
    labels = np.r_[np.zeros(len(good_maps)), np.ones(len(damaged_maps))]
    pixel_masks = np.concatenate([np.zeros((len(good_maps),) + masks.shape[1:], bool), masks])
    det = detector.cfg.detect
    result: dict[str, Any] = {"n_good": len(good_maps), "n_anomalous": len(damaged_maps)}
    for name, keep in (("residual", slice(0, 1)), ("fused", slice(0, 2))):
        maps = combine_component_maps(torch.from_numpy(np.concatenate([good_maps, damaged_maps])[:, keep]))
        scores = image_score(maps, det.score, det.topk).double().numpy()
        result[name] = {"image_auroc": image_auroc(scores, labels),
                        "pixel_auroc": pixel_auroc(maps[:, 0].numpy(), pixel_masks)}
    return result


def head_earns_its_place(check: dict[str, Any]) -> bool:
    """True when the fused map is at least as good as the residual: mean of image and pixel AUROC,
    within TIE_TOLERANCE."""
    def quality(name: str) -> float:
        return (check[name]["image_auroc"] + check[name]["pixel_auroc"]) / 2
    return quality("fused") >= quality("residual") - TIE_TOLERANCE
