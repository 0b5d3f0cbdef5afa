"""anoddpm.detection.references: thumbnails, the pooled bank and the nearest-good reference, by hand."""
import pytest
import torch

from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.detection.references import neighbour_reference, pool_bank_maps, thumbnail_features


def test_reference_is_the_mean_of_the_k_nearest_maps_plus_its_spatial_mean():
    bank_features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    bank_maps = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]]], [[[2.0, 2.0], [2.0, 2.0]]], [[[7.0, 7.0], [7.0, 7.0]]]])
    query = torch.tensor([[0.1, 0.0], [4.0, 4.0]])
    one = neighbour_reference(query, bank_features, bank_maps, k=1, size=2)
    torch.testing.assert_close(one[0, 0], torch.tensor([[3.0, 5.0], [3.0, 5.0]]))  # map 0 + its mean 2
    torch.testing.assert_close(one[1, 0], torch.full((2, 2), 14.0))  # map 2 + its mean 7
    two = neighbour_reference(query, bank_features, bank_maps, k=2, size=2)
    torch.testing.assert_close(two[0, 0], torch.tensor([[3.5, 4.5], [3.5, 4.5]]))  # mean of maps 0, 1 + 2
    torch.testing.assert_close(two[1, 0], torch.full((2, 2), 9.0))  # maps 2 and 1: mean 4.5, + 4.5
    big = neighbour_reference(query, bank_features, bank_maps, k=1, size=8)
    assert big.shape == (2, 1, 8, 8) and torch.allclose(big[1], torch.full((1, 8, 8), 14.0))


def test_thumbnails_average_grey_blocks_and_the_bank_pools_by_four():
    images = torch.zeros(1, 3, 32, 32)
    images[0, 0, :2, :2] = 0.9  # one 2 x 2 block of the 16 x 16 thumbnail, in one of three channels
    features = thumbnail_features(images)
    assert features.shape == (1, 256)
    assert features[0, 0].item() == pytest.approx(0.3) and features[0, 1:].abs().max().item() == 0.0
    assert thumbnail_features(torch.zeros(2, 1, 40, 40)).shape == (2, 100)  # 40 px: a 10 x 10 thumbnail
    maps = torch.arange(64.0).view(1, 1, 8, 8)
    pooled = pool_bank_maps(maps)
    assert pooled.shape == (1, 1, 2, 2) and pooled[0, 0, 0, 0].item() == pytest.approx(maps[0, 0, :4, :4].mean().item())


def test_a_bank_of_the_wrong_shape_is_refused():
    cfg = (Config().override("model", preset="tiny").override("data", image_size=32, channels=1)
           .override("detect", scorer="residual"))
    det = Detector.from_config(cfg)
    features = thumbnail_features(torch.rand(4, 1, 32, 32))
    with pytest.raises(ValueError, match="one per component: residual"):
        det.reference.fit_nearest_good(features, torch.rand(4, 2, 8, 8))
    with pytest.raises(ValueError, match=">= 0"):
        det.reference.fit_nearest_good(features, -torch.rand(4, 1, 8, 8))
    det.reference.fit_nearest_good(features, torch.rand(4, 1, 8, 8))
    assert det.reference.has_reference_bank
    det.reset_fitted_state()
    assert not det.reference.has_reference_bank


def test_a_large_training_split_gives_an_evenly_spaced_bank(monkeypatch):
    import numpy as np

    import anoddpm.detection.calibration as calibration
    from anoddpm.detection.tiling import inspection_detector

    monkeypatch.setattr(calibration, "BANK_MAX_IMAGES", 22)
    cfg = (Config().override("model", preset="tiny").override("data", image_size=32, channels=1)
           .override("detect", scorer="residual"))
    det = Detector.from_config(cfg).eval()
    bank = torch.rand(43, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    good = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    scored = calibration.fit_and_score_good(inspection_detector(det, 16), good, torch.device("cpu"), batch_size=16,
                                            bank_images=bank)
    assert det.reference.bank_features.shape == (22, 256) and det.reference.bank_maps.shape == (22, 1, 8, 8)
    torch.testing.assert_close(det.reference.bank_features, thumbnail_features(bank[0::2]))  # 0, 2, ..., 42
    with torch.inference_mode():
        np.testing.assert_allclose(scored.scores, det(good)[1].double().numpy(), rtol=1e-6)
        # pooled batch by batch while scoring (batch 16): the same as pooling the whole bank's maps
        torch.testing.assert_close(det.reference.bank_maps, pool_bank_maps(det.component_maps(bank[0::2])[0]),
                                   rtol=1e-5, atol=1e-6)
