"""Scoring: residual maps, blur, SSIM and image scores against hand values."""
import math

import pytest
import torch

from anoddpm.detection.maps import BRIGHTNESS_FLOOR, anomaly_map, gaussian_blur, image_score, ssim_map


def test_l2_and_l1_maps_hand_values_channel_mean():
    images = torch.zeros(1, 3, 2, 2)
    recon = torch.zeros(1, 3, 2, 2)
    recon[0, 0, 0, 0] = 0.6  # one channel differs at one pixel
    l2 = anomaly_map(images, recon, "l2", sigma=0)
    l1 = anomaly_map(images, recon, "l1", sigma=0)
    assert l2.shape == (1, 1, 2, 2)
    assert l2[0, 0, 0, 0].item() == pytest.approx(0.36 / 3)
    assert l1[0, 0, 0, 0].item() == pytest.approx(0.6 / 3)
    assert l2[0, 0, 1, 1].item() == 0.0


def test_brightness_norm_scores_the_same_error_higher_on_a_dark_surface():
    images = torch.cat([torch.full((1, 1, 16, 16), 0.8), torch.full((1, 1, 16, 16), 0.1)])  # bright, dark
    recon = images.clone()
    recon[:, 0, 8, 8] += 0.1  # the same error of 0.1 grey levels on both
    plain = anomaly_map(images, recon, "l2", sigma=0)
    relative = anomaly_map(images, recon, "l2", sigma=0, norm="brightness")
    assert plain[0, 0, 8, 8].item() == pytest.approx(plain[1, 0, 8, 8].item())
    assert relative[0, 0, 8, 8].item() == pytest.approx(0.01 / (0.8 + BRIGHTNESS_FLOOR), rel=1e-4)
    assert relative[1, 0, 8, 8].item() == pytest.approx(0.01 / (0.1 + BRIGHTNESS_FLOOR), rel=1e-4)
    assert relative[:, 0, 0, 0].abs().max().item() == 0.0


def test_blur_preserves_constant_and_mass_spreads_symmetrically():
    torch.testing.assert_close(gaussian_blur(torch.full((2, 1, 16, 16), 0.7), 2.0), torch.full((2, 1, 16, 16), 0.7))
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, 16, 16] = 1.0
    y = gaussian_blur(x, 1.0)
    g = [math.exp(-0.5 * d * d) for d in range(-3, 4)]
    centre = (1.0 / sum(g)) ** 2
    assert y[0, 0, 16, 16].item() == pytest.approx(centre, rel=1e-5)
    assert y.sum().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(y, y.flip(-1))


def test_ssim_identical_is_one_and_residual_zero():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim_map(a, a), torch.ones_like(a), atol=1e-4, rtol=0)
    assert anomaly_map(a, a, "ssim", sigma=2.0).abs().max().item() < 1e-4


def test_ssim_constant_images_hand_value():
    # flat patches: ssim = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1)
    assert anomaly_map(a, b, "ssim", sigma=0)[0, 0, 8, 8].item() == pytest.approx(1 - expected, rel=1e-4)


def test_image_score_max_and_topk():
    amap = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    amap[1] *= 2
    torch.testing.assert_close(image_score(amap, "max"), torch.tensor([15.0, 30.0]))
    torch.testing.assert_close(image_score(amap, "topk", topk=3), torch.tensor([14.0, 28.0]))
    torch.testing.assert_close(image_score(amap, "topk", topk=1000), torch.tensor([7.5, 15.0]))


@pytest.mark.parametrize("call", [
    lambda: anomaly_map(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), "l3"),
    lambda: anomaly_map(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), "l2", norm="contrast"),
    lambda: image_score(torch.zeros(1, 1, 4, 4), "mean"),
    lambda: image_score(torch.zeros(1, 1, 4, 4), "topk", topk=0),
])
def test_bad_values_raise(call):
    with pytest.raises(ValueError, match="detect"):
        call()
