"""Synthetic anomalies: shapes, ranges, determinism, the mask/change contract and the mix of kinds."""
import pytest
import torch

from anoddpm.data.anomalies import CLEAN_FRACTION, VISIBLE, synthesize_anomalies


def _textures(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random good images in [0.2, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, size // 8, size // 8, generator=g)
    return 0.2 + 0.6 * torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def batch():
    images = _textures(192, 1, 64)
    out, masks = synthesize_anomalies(images, torch.Generator().manual_seed(1))
    return images, out, masks


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_ranges(channels):
    images = _textures(6, channels, 32)
    out, masks = synthesize_anomalies(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert masks.shape == (6, 1, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_deterministic_by_generator():
    images = _textures(8, 1, 32)
    a = synthesize_anomalies(images, torch.Generator().manual_seed(5))
    b = synthesize_anomalies(images, torch.Generator().manual_seed(5))
    c = synthesize_anomalies(images, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mask_marks_exactly_the_visible_changes(batch):
    images, out, masks = batch
    change = (out - images).abs().amax(dim=1, keepdim=True)
    assert change[masks == 0].max() <= VISIBLE + 1e-6
    assert change[masks == 1].min() > VISIBLE


def test_clean_fraction(batch):
    images, out, masks = batch
    unchanged = (out == images).flatten(1).all(1).float().mean().item()
    empty = (masks.flatten(1).sum(1) == 0).float().mean().item()
    assert abs(unchanged - CLEAN_FRACTION) < 0.12
    assert unchanged <= empty < unchanged + 0.15


def test_coverage_spans_specks_to_large_regions(batch):
    _, _, masks = batch
    cover = masks.flatten(1).mean(1)
    cover = cover[cover > 0]
    assert cover.min() < 0.01  # specks, cracks
    assert cover.max() > 0.25  # large regions
    assert 0.2 < (cover < 0.02).float().mean() < 0.7


def test_large_low_contrast_changes_are_present(batch):
    images, out, masks = batch
    cover = masks.flatten(1).mean(1)
    peak = (out - images).abs().flatten(1).amax(1)
    soft = (cover > 0.05) & (peak < 0.25) & (((out - images).abs() > 0) & (masks == 0)).flatten(1).any(1)
    assert soft.sum() >= 10  # "uneven"-like: large, faint, with a soft rim below VISIBLE


def test_pool_supplies_patches_and_is_checked():
    images = _textures(4, 1, 32)
    out, masks = synthesize_anomalies(images, torch.Generator().manual_seed(0), pool=_textures(3, 1, 32, seed=9))
    assert out.shape == images.shape
    with pytest.raises(ValueError, match="pool"):
        synthesize_anomalies(images, torch.Generator(), pool=torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="images"):
        synthesize_anomalies(images[0], torch.Generator())


@pytest.mark.parametrize("clean_fraction", [0.0, 1.0])
def test_clean_fraction_argument(clean_fraction):
    images = _textures(64, 1, 32, seed=3)
    out, masks = synthesize_anomalies(images, torch.Generator().manual_seed(2), clean_fraction=clean_fraction)
    changed = (out != images).flatten(1).any(1).float().mean().item()
    if clean_fraction == 1.0:
        assert changed == 0.0 and masks.sum() == 0
    else:
        assert changed > 0.9  # only anomalies that came out invisible leave a sample unchanged


def test_clean_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match="clean_fraction"):
        synthesize_anomalies(_textures(2, 1, 32), torch.Generator().manual_seed(0), clean_fraction=1.5)
