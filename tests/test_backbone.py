"""anoddpm/backbone.py: the frozen pretrained extractor, its weights file and the bundle's record of them."""
from dataclasses import replace

import pytest
import torch

from anoddpm.detection.backbone import FeatureExtractor, backbone_identity, build_backbone, weights_file, weights_sha256
from anoddpm.config import BackboneConfig

CFG = BackboneConfig(image_size=64)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return build_backbone(CFG)


def test_stage_shapes_channels_and_grey_input(extractor):
    grey = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    stage3, stage5 = extractor(grey)  # resized to 64 px: stride 8 and 16
    assert stage3.shape == (2, 40, 8, 8) and stage5.shape == (2, 112, 4, 4)
    rgb = extractor(grey.expand(-1, 3, -1, -1))
    assert torch.equal(rgb[0], stage3)  # grey is replicated to three channels


def test_frozen_and_stays_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(extractor(x)[1], extractor(x)[1])  # batch norm uses the pretrained statistics


def test_pretrained_weights_are_loaded_not_random():
    """ImageNet weights give structured features: a flat image and a checkerboard differ strongly at stage 3."""
    a = build_backbone(CFG)
    flat = torch.full((1, 3, 64, 64), 0.5)
    board = ((torch.arange(64)[:, None] // 4 + torch.arange(64)[None] // 4) % 2).float().expand(1, 3, 64, 64)
    assert (a(board)[0] - a(flat)[0]).abs().mean() > 0.1
    b = build_backbone(CFG)
    assert torch.equal(a(board)[0], b(board)[0])


def test_identity_records_the_weights_sha256():
    identity = backbone_identity(CFG)
    assert identity["name"] == "efficientnet_lite0"
    assert identity["sha256"] == weights_sha256(weights_file(CFG)) and len(identity["sha256"]) == 64


def test_other_weights_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="not the ones this model was calibrated with"):
        build_backbone(CFG, expected_sha256="0" * 64)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(replace(CFG, weights=str(missing)))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth does not hold efficientnet_lite0 weights"):
        build_backbone(replace(CFG, weights=str(bad)))


def test_local_weights_file_is_used(tmp_path):
    """A user's own copy of the weights (backbone.weights) loads, and its hash is what the bundle records."""
    state = torch.load(weights_file(CFG), weights_only=True)
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 2.0
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    cfg = replace(CFG, weights=str(path))
    assert backbone_identity(cfg)["sha256"] == weights_sha256(path) != backbone_identity(CFG)["sha256"]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(build_backbone(cfg)(x)[0], build_backbone(CFG)(x)[0])


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="backbone.layers"):
        build_backbone(replace(CFG, layers=(3, 9)))
