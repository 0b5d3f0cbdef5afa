"""The backbone adapted to the reconstructions (train --adapt-steps): what it learns, where it lives, who uses it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.cli import main
from anoddpm.detection.backbone import FeatureExtractor, build_backbone
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.unet import build_unet
from anoddpm.training.adaptation import adapt_backbone, location_distance, reconstruct_all, training_images
from deploy.export import export_onnx
from deploy.runtime import Inspector
from test_evaluate_cli import tiny_config


def _cfg(steps: int = 20):
    return (tiny_config().override("backbone", image_size=64).override("detect", scorer="feature_residual")
            .override("train", adapt_steps=steps, batch_size=4).validate())


@pytest.fixture(scope="module")
def adapted(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle with an adapted backbone, calibrated; the same bundle without, uncalibrated), random-weight tiny UNet."""
    from anoddpm.data.datasets import load_training_data

    tmp = tmp_path_factory.mktemp("adapt")
    cfg = _cfg()
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    train_ds, _, fingerprint = load_training_data(cfg, synth_root, "synthetic", 0)
    weights = adapt_backbone(cfg, unet, GaussianDiffusion.from_config(cfg.diffusion), train_ds, torch.device("cpu"))
    common = {"cfg": cfg, "state_dict": unet.state_dict(), "fingerprint": fingerprint}
    with_copy = save_bundle(tmp / "adapted.pt", adapted_backbone=weights, **common)
    assert main(["calibrate", "--model", str(with_copy), "--batch-size", "4", "-q"]) == 0
    return with_copy, save_bundle(tmp / "plain.pt", **common)


def test_adaptation_brings_good_images_and_their_reconstructions_together(synth_root, adapted, one_thread):
    from anoddpm.data.datasets import load_training_data

    cfg = _cfg()
    bundle = load_bundle(adapted[0])
    train_ds, _, _ = load_training_data(cfg, synth_root, "synthetic", 0)
    unet = build_unet(cfg)
    unet.load_state_dict(bundle.state_dict)
    images = training_images(cfg, train_ds)
    rebuilt = reconstruct_all(cfg, unet.eval(), GaussianDiffusion.from_config(cfg.diffusion), images,
                              torch.device("cpu"))
    frozen = build_backbone(cfg.backbone)
    copy = build_backbone(cfg.backbone)
    copy.load_adapted(bundle.adapted_backbone)
    with torch.no_grad():
        before = float(location_distance(frozen(images), frozen(rebuilt)))
        after = float(location_distance(copy(images), copy(rebuilt)))
        drift = float(location_distance(copy(images), frozen(images)))
    assert after < 0.7 * before, (before, after)
    assert drift < before  # kept near the pretrained network: it still describes the images


def test_feature_residual_uses_the_adapted_backbone_and_onnx_agrees(adapted, tmp_path, one_thread):
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with_copy = Detector.from_bundle(load_bundle(adapted[0]))
    without = Detector.from_bundle(load_bundle(adapted[1]))
    assert with_copy.parts[0].adapted is not None and without.parts[0].adapted is None
    with torch.inference_mode():
        amap, score, _ = with_copy(images)
        plain_map = without(images)[0]
    assert (amap - plain_map).abs().max() > 1e-3  # the adapted features give another map
    assert with_copy.backbone is None  # the adapted copy alone: the frozen backbone is not built
    residual_only = Detector.from_bundle(load_bundle(adapted[0]), scorer="residual")
    assert not any(isinstance(m, FeatureExtractor) for m in residual_only.modules())
    onnx_path = export_onnx(adapted[0], tmp_path / "model.onnx")
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4


def test_info_counts_the_adapted_parameters(adapted, capsys):
    capsys.readouterr()
    assert main(["info", str(adapted[0])]) == 0
    with_copy = json.loads(capsys.readouterr().out)["adapted_backbone_parameters"]
    assert main(["info", str(adapted[1])]) == 0
    assert json.loads(capsys.readouterr().out)["adapted_backbone_parameters"] is None
    frozen = build_backbone(_cfg().backbone)
    assert with_copy == sum(v.numel() for v in frozen.state_dict().values() if v.is_floating_point()) > 100_000


def test_a_calibration_is_sealed_to_the_adapted_weights(adapted, tmp_path):
    raw = torch.load(adapted[0], weights_only=True)
    assert raw["threshold"] is not None
    raw["adapted_backbone"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in raw["adapted_backbone"].items()}
    torch.save(raw, tmp_path / "swapped.pt")
    with pytest.raises(ValueError, match="calibration does not belong to its weights"):
        load_bundle(tmp_path / "swapped.pt")
    name = next(iter(raw["adapted_backbone"]))
    raw["adapted_backbone"][name] = raw["adapted_backbone"][name] * float("nan")
    torch.save(raw, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="adapted_backbone"):
        load_bundle(tmp_path / "nan.pt")
    raw["adapted_backbone"] = {"stem.0.weight": torch.zeros(3)}
    raw["threshold"] = None
    torch.save(raw, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="adapted backbone weights do not fit"):
        Detector.from_bundle(load_bundle(tmp_path / "foreign.pt"))


def test_train_adapt_steps_writes_the_adapted_backbone(synth_root, tmp_path, capsys, one_thread):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"backbone": {"image_size": 64}, "detect": {"scorer": "residual+feature_residual"},
                                  "model": {"preset": "tiny"}}))
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(run), "--config",
                 str(config), "--max-steps", "2", "--image-size", "32", "--channels", "1", "--batch-size", "4",
                 "--adapt-steps", "3", "-q"]) == 0
    bundle = load_bundle(run / "model.pt")
    assert bundle.cfg.train.adapt_steps == 3 and bundle.adapted_backbone is not None
    assert bundle.threshold is not None and bundle.threshold["components"] == ["residual", "feature_residual"]
    assert any('"adapt_steps": 3' in line for line in (run / "log.jsonl").read_text().splitlines())
    assert main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(tmp_path / "bad"),
                 "--adapt-steps", "-1", "--max-steps", "1"]) == 2
    assert "adapt_steps" in capsys.readouterr().err

