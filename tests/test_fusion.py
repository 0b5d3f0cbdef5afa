"""detect.fusion: geometric and max combination of component maps; the max fusion's scales are fitted by
calibration, travel in the bundle and the ONNX graph, and belong to their threshold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.cli import main
from anoddpm.data.datasets import load_training_data
from anoddpm.detection.detector import Detector, combine_component_maps
from anoddpm.detection.settings import calibrated_for
from anoddpm.data.synth import make_synthetic_dataset
from deploy.export import export_onnx
from deploy.runtime import Inspector
from test_evaluate_cli import make_bundle, tiny_config


def test_max_fusion_keeps_what_one_component_finds_and_geometric_needs_both():
    maps = torch.ones(1, 2, 4, 4)
    maps[0, 0, 1, 1] = 9.0  # only the first component flags this pixel
    assert float(combine_component_maps(maps, "max")[0, 0, 1, 1]) == 9.0
    assert float(combine_component_maps(maps, "geometric")[0, 0, 1, 1]) == pytest.approx(3.0)
    assert float(combine_component_maps(maps, "mean")[0, 0, 1, 1]) == pytest.approx(5.0)  # DDAD's sum, halved
    assert combine_component_maps(maps[:, :1], "max").equal(maps[:, :1])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, bundle calibrated with residual+feature_memory fused by max on a generated 32 px set)."""
    tmp = tmp_path_factory.mktemp("fusion")
    make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=12, n_test_good=4, n_test_defect=6)
    cfg = tiny_config().override("backbone", image_size=64).override("detect", memory_size=200).validate()
    model = make_bundle(tmp / "run" / "model.pt", tmp / "data", "cat", cfg)
    assert main(["calibrate", "--model", str(model), "--scorer", "residual+feature_memory", "--fusion", "max",
                 "--batch-size", "4"]) == 0
    return tmp / "data", model


def test_scales_put_each_component_at_one_on_a_typical_held_back_good_image(calibrated):
    data, model = calibrated
    bundle = load_bundle(model)
    assert bundle.cfg.detect.fusion == "max" and bundle.component_scale.shape == (2,)
    detector = Detector.from_bundle(bundle)
    assert detector.fusion.has_component_scale and calibrated_for(bundle.threshold, detector)
    _, val, _ = load_training_data(bundle.cfg, data, "cat", bundle.cfg.train.seed)
    with torch.inference_mode():
        components, _ = detector.referenced_components(torch.stack([torch.as_tensor(a) for a in val.arrays]))
    scaled = components / detector.fusion.component_scale.view(1, -1, 1, 1)
    medians = np.median(scaled.amax(dim=(2, 3)).numpy(), axis=0)
    assert np.allclose(medians, 1.0, atol=1e-5), medians
    # the raw units differ by orders of magnitude: a max without scales would be one component alone
    assert float(bundle.component_scale.max() / bundle.component_scale.min()) > 3.0


def test_a_threshold_of_one_fusion_never_judges_the_other(calibrated, tmp_path):
    data, model = calibrated
    bundle = load_bundle(model)
    assert not calibrated_for(bundle.threshold, Detector.from_bundle(bundle, fusion="geometric"))
    assert not Detector.from_bundle(bundle, fusion="geometric").fusion.has_component_scale
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--category", "cat", "--out", str(out),
                 "--fusion", "geometric", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"] == "validation split (on the fly)" and metrics["detect"]["fusion"] == "geometric"


def test_info_shows_scales_and_onnx_matches_pytorch_with_max_fusion(calibrated, tmp_path, capsys):
    _, model = calibrated
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    assert len(json.loads(capsys.readouterr().out)["component_scale"]) == 2
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        amap, score, _ = Detector.from_bundle(load_bundle(model))(images)
    o_map, o_score = Inspector(export_onnx(model, tmp_path / "model.onnx")).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4


def test_a_bundle_from_before_detect_fusion_keeps_the_geometric_mean(tmp_path):
    """Bundles and thresholds saved without detect.fusion (older than it) fused by the geometric mean, as they
    did then: they load with it, and their threshold is not taken for the current default (max)."""
    from dataclasses import asdict

    from anoddpm.bundle import save_bundle
    from anoddpm.config import DetectConfig
    from anoddpm.detection.settings import detect_differences
    from anoddpm.model.unet import build_unet

    cfg = tiny_config().override("detect", scorer="fused")
    path = save_bundle(tmp_path / "old.pt", cfg=cfg, state_dict=build_unet(cfg).state_dict(), fingerprint={})
    raw = torch.load(path, weights_only=True)
    del raw["config"]["detect"]["fusion"]
    torch.save(raw, path)
    assert load_bundle(path).cfg.detect.fusion == "geometric" and DetectConfig().fusion == "max"
    old_threshold = {k: v for k, v in asdict(cfg.detect).items() if k != "fusion"}
    assert detect_differences(old_threshold, asdict(cfg.override("detect", fusion="max").detect)) == ["fusion"]
    assert detect_differences(old_threshold, asdict(cfg.override("detect", fusion="geometric").detect)) == []


def test_mean_fusion_uses_the_fitted_scales_and_onnx_matches_pytorch(calibrated, tmp_path):
    data, model = calibrated
    copy = tmp_path / "model.pt"
    copy.write_bytes(model.read_bytes())
    assert main(["calibrate", "--model", str(copy), "--fusion", "mean", "--batch-size", "4", "-q"]) == 0
    bundle = load_bundle(copy)
    detector = Detector.from_bundle(bundle)
    assert bundle.cfg.detect.fusion == "mean" and detector.fusion.scales_components
    assert torch.allclose(bundle.component_scale, load_bundle(model).component_scale)  # the same units as max
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        components, _ = detector.referenced_components(images)
        amap, score, _ = detector(images)
    expected = (components / bundle.component_scale.view(1, -1, 1, 1)).mean(dim=1, keepdim=True)
    assert torch.allclose(amap, expected, atol=1e-6)
    o_map, o_score = Inspector(export_onnx(copy, tmp_path / "model.onnx")).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4
