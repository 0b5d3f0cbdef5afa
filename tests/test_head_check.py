"""The head check: residual vs fused map on synthetic anomalies of held-back good images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.training.head_check import compare_scorers_on_synthetic, head_earns_its_place
from anoddpm.model.unet import build_unet
from benchmarks.blur_denoiser import BlurDenoiser
from anoddpm.detection.maps import gaussian_blur

SIZE = 32


class _ConstantHead(torch.nn.Module):
    """Finds nothing: the same probability everywhere."""

    def anomaly_map(self, images, reconstructions):
        return torch.full_like(images[:, :1], 0.5)


class _GuessingHead(torch.nn.Module):
    """Marks random places: confident blobs that follow a hash of the pixel values, not the anomalies."""

    def anomaly_map(self, images, reconstructions):
        field = gaussian_blur(torch.sin(1e4 * images[:, :1]), 3.0)
        return torch.sigmoid(20 * field / field.std())


def _detector(head: torch.nn.Module) -> Detector:
    cfg = (Config().override("data", image_size=SIZE, channels=1).override("model", preset="tiny")
           .override("detect", depth=20, steps=1, smoothing_sigma=1.0, scorer="fused"))
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    detector = Detector(build_unet(cfg), diffusion, cfg, head)
    detector.reconstructor.unet = BlurDenoiser(diffusion, 2.0)
    return detector.eval()


def _smooth_good_images(n: int) -> torch.Tensor:
    """Good images [n, 1, S, S] in [0, 1]: smooth random fields, which the smoother reconstructs."""
    noise = torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    return (0.5 + 2.5 * (gaussian_blur(noise, 4.0) - 0.5)).clamp(0, 1)


@pytest.mark.parametrize("n_good", [6, 24])  # without and with the per-pixel reference (20+ images)
def test_a_head_that_finds_nothing_ties_the_residual_and_is_kept(n_good):
    check = compare_scorers_on_synthetic(_detector(_ConstantHead()), _smooth_good_images(n_good), torch.device("cpu"))
    assert check["n_good"] == n_good and check["n_anomalous"] >= 50
    assert check["residual"]["image_auroc"] > 0.85 and check["residual"]["pixel_auroc"] > 0.7, check
    # the geometric mean with a constant ranks every image and pixel as the residual alone does
    for metric in ("image_auroc", "pixel_auroc"):
        assert check["fused"][metric] == pytest.approx(check["residual"][metric], abs=1e-4)  # float32 ties
    assert head_earns_its_place(check)


def test_a_head_that_guesses_is_dropped():
    check = compare_scorers_on_synthetic(_detector(_GuessingHead()), _smooth_good_images(24), torch.device("cpu"))
    for metric in ("image_auroc", "pixel_auroc"):
        assert check["fused"][metric] < check["residual"][metric] - 0.05, check
    assert not head_earns_its_place(check)


def test_the_check_is_deterministic_and_needs_both_maps():
    detector, images = _detector(_GuessingHead()), _smooth_good_images(6)
    first = compare_scorers_on_synthetic(detector, images, torch.device("cpu"))
    assert compare_scorers_on_synthetic(detector, images, torch.device("cpu")) == first
    residual_only = Detector(detector.unet, detector.diffusion, detector.cfg.override("detect", scorer="residual"))
    with pytest.raises(ValueError, match="residual and head"):
        compare_scorers_on_synthetic(residual_only, images, torch.device("cpu"))
    assert np.isfinite([first[n][m] for n in ("residual", "fused") for m in ("image_auroc", "pixel_auroc")]).all()
