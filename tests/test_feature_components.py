"""Feature-space components end to end: calibrate fits the memory, evaluate/info show it, ONNX == PyTorch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.cli import main
from anoddpm.detection.detector import Detector
from anoddpm.detection.settings import calibrated_for
from anoddpm.data.synth import make_synthetic_dataset
from deploy.export import export_onnx
from deploy.runtime import Inspector
from test_evaluate_cli import make_bundle, tiny_config


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, bundle calibrated with residual+feature_memory on a generated 32 px set, backbone at 64 px)."""
    tmp = tmp_path_factory.mktemp("features")
    make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=12, n_test_good=4, n_test_defect=6)
    cfg = tiny_config().override("backbone", image_size=64).override("detect", memory_size=200).validate()
    model = make_bundle(tmp / "run" / "model.pt", tmp / "data", "cat", cfg)
    assert main(["calibrate", "--model", str(model), "--scorer", "residual+feature_memory", "--batch-size", "4"]) == 0
    return tmp / "data", model


def test_calibration_stores_memory_backbone_and_components(calibrated):
    _, model = calibrated
    bundle = load_bundle(model)
    assert bundle.feature_memory.shape == (200, 152)  # coreset of 40 + 112 channel descriptors
    assert bundle.backbone["name"] == "efficientnet_lite0" and len(bundle.backbone["sha256"]) == 64
    assert bundle.threshold["components"] == ["residual", "feature_memory"]
    detector = Detector.from_bundle(bundle)
    assert detector.parts[-1].fitted and calibrated_for(bundle.threshold, detector)
    assert not calibrated_for(bundle.threshold, Detector.from_bundle(bundle, scorer="residual"))


def test_memory_distance_rises_where_a_pattern_was_pasted_on_a_good_image(calibrated):
    data, model = calibrated
    from anoddpm.data.imageio import load_image

    detector = Detector.from_bundle(load_bundle(model), scorer="feature_memory")
    detector.load_fitted_state({"feature_memory": load_bundle(model).feature_memory})
    path = sorted((data / "cat" / "train" / "good").iterdir())[0]
    d = detector.cfg.data
    good = torch.as_tensor(load_image(path, d.channels, d.image_size, d.resize_policy))[None]
    odd = good.clone()
    odd[..., 8:24, 8:24] = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        maps, _ = detector.component_maps(torch.cat([good, odd]))
    assert maps[1, 0, 12:20, 12:20].mean() > 1.5 * maps[0, 0, 12:20, 12:20].mean()


def test_evaluate_reports_and_info_shows_the_backbone(calibrated, tmp_path, capsys):
    data, model = calibrated
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--category", "cat", "--out", str(out),
                 "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"] == "bundle" and 0.0 <= metrics["image_auroc"] <= 1.0
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"]["feature_memory_shape"] == [200, 152] and info["backbone"]["layers"] == [3, 5]


def test_other_backbone_weights_are_refused(calibrated, tmp_path):
    _, model = calibrated
    bundle = load_bundle(model)
    bundle.backbone = {**bundle.backbone, "sha256": "f" * 64}
    with pytest.raises(ValueError, match="not the ones this model was calibrated with"):
        Detector.from_bundle(bundle)


def test_onnx_graph_holds_backbone_and_memory_and_matches_pytorch(calibrated, tmp_path):
    _, model = calibrated
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        amap, score, _ = Detector.from_bundle(load_bundle(model))(images)
    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4
    one = Inspector(onnx_path, batch_size=1).run(images.numpy()[:1])[1]
    assert abs(float(one[0]) - float(o_score[0])) < 1e-5


def test_a_detection_flag_keeps_the_memory_it_does_not_touch(calibrated, tmp_path, monkeypatch):
    """Recalibrating for --depth reuses the bundle's feature memory (same data, memory size, seed); --memory-size refits."""
    import anoddpm.detection.components.feature_memory as fm

    data, model = calibrated
    fitted = []
    real_fit = fm.fit_feature_memory
    monkeypatch.setattr(fm, "fit_feature_memory", lambda *a, **k: fitted.append(1) or real_fit(*a, **k))
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--category", "cat", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "depth"), "--depth", "20"]) == 0
    assert fitted == []
    kept = json.loads((tmp_path / "depth" / "metrics.json").read_text())
    assert main([*argv, "--out", str(tmp_path / "size"), "--depth", "20", "--memory-size", "199"]) == 0
    assert fitted == [1]
    refit = json.loads((tmp_path / "size" / "metrics.json").read_text())
    assert kept["image_auroc"] is not None and refit["image_auroc"] is not None
    import anoddpm.detection.calibration as calibration

    monkeypatch.setattr(calibration, "reusable_states", lambda *a: {})  # the same evaluate, memory fitted again
    assert main([*argv, "--out", str(tmp_path / "again"), "--depth", "20"]) == 0
    scores = [(tmp_path / name / "per_image.csv").read_text() for name in ("depth", "again")]
    assert scores[0] == scores[1]  # keeping the memory changes no score
