"""anoddpm/feature_scoring.py: patch descriptors, feature residual, nearest-bank distance, greedy coreset."""
import math

import torch

import anoddpm.detection.components.feature_memory as fs
from anoddpm.detection.components.feature_residual import feature_residual_map


def test_patch_features_pool_and_upsample_to_the_finest_grid():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.ones(1, 2, 2, 2)
    out = fs.patch_features([fine, coarse], pool=3)
    assert out.shape == (1, 3, 4, 4)
    assert out[0, 0, 1, 1] == fine[0, 0, :3, :3].mean()  # 3x3 mean
    assert out[0, 0, 0, 0] == fine[0, 0, :2, :2].mean()  # padding not counted at the border
    assert torch.all(out[0, 1:] == 1.0)


def test_feature_residual_is_zero_for_identical_and_two_for_opposite_features():
    a = [torch.rand(2, 5, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1]
    same = feature_residual_map(a, [x.clone() for x in a], size=8)
    opposite = feature_residual_map(a, [-x for x in a], size=8)
    assert same.shape == (2, 1, 8, 8) and same.abs().max() < 1e-5
    assert (opposite - 2.0).abs().max() < 1e-5


def test_memory_distance_is_the_nearest_bank_distance_in_any_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(2, 6, 3, 3, generator=gen)
    bank = torch.rand(50, 6, generator=gen)
    bank[7] = features[1, :, 2, 0]  # one location is in the bank
    queries = features.permute(0, 2, 3, 1).reshape(-1, 6)
    expected = torch.cdist(queries, bank).amin(1).view(2, 1, 3, 3)
    whole = fs.memory_distance_map(features, bank, size=3)
    monkeypatch.setattr(fs, "MEMORY_CHUNK", 8)
    chunked = fs.memory_distance_map(features, bank, size=3)
    assert torch.allclose(whole, expected, atol=1e-3) and torch.allclose(chunked, expected, atol=1e-3)
    assert whole[1, 0, 2, 0] < 1e-3


def test_greedy_coreset_covers_every_cluster_before_repeating_one():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(30, 2, generator=gen) for c in centres])
    picked = fs.greedy_coreset(points, 4, torch.Generator().manual_seed(3))
    assert sorted((picked // 30).tolist()) == [0, 1, 2, 3]
    assert fs.greedy_coreset(points, 500, gen).tolist() == list(range(120))  # asking for more keeps them all


def test_coreset_radius_shrinks_with_its_size():
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(400, 3, generator=gen)

    def radius(m):
        bank = points[fs.greedy_coreset(points, m, torch.Generator().manual_seed(0))]
        return torch.cdist(points, bank).amin(1).max().item()

    assert radius(64) < radius(16) < radius(4)
    assert radius(64) < 2.0 / math.sqrt(64) ** (2 / 3)  # well below the unit cube's diagonal
