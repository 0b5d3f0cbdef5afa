"""deploy/export.py: bundle -> ONNX, metadata, and onnxruntime == PyTorch Detector parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle, update_threshold
from anoddpm.cli import main as cli
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.unet import build_unet
from deploy.export import export_onnx
from deploy.runtime import Inspector

SIZE, STEPS = 32, 2


def _bundle(path: Path, threshold: dict | None) -> Path:
    """Tiny random UNet (every weight perturbed, so no layer is zero) saved as a bundle."""
    cfg = (Config().override("model", preset="tiny").override("data", image_size=SIZE)
           .override("detect", scorer="residual").validate())
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # build_unet's initialisation: the same weights on every call
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in build_unet(cfg).state_dict().items()}
    return save_bundle(path, cfg=cfg, state_dict=state, fingerprint={"source": "random", "n": 0}, threshold=threshold)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images) -> tuple[Path, Path]:
    """(bundle, ONNX with reconstruction) with a threshold between two of the images' torch scores."""
    tmp = tmp_path_factory.mktemp("export")
    bundle = _bundle(tmp / "model.pt", None)
    with torch.inference_mode():
        scores = Detector.from_bundle(load_bundle(bundle), steps=STEPS)(images)[1].sort().values
    threshold = {"image": float(scores[1:3].mean()), "pixel": None, "method": "quantile",
                 "detect": {"steps": STEPS, "scorer": "residual", "fusion": "max"}}
    bundle = _bundle(tmp / "model.pt", threshold)
    onnx_path = tmp / "model.onnx"
    code = cli(["export", "--model", str(bundle), "--out", str(onnx_path), "--steps", str(STEPS),
                "--with-reconstruction"])
    assert code == 0
    return bundle, onnx_path


def test_onnx_matches_pytorch_fast_path(exported, images):
    bundle_path, onnx_path = exported
    bundle = load_bundle(bundle_path)
    with torch.inference_mode():
        amap, score, recon = Detector.from_bundle(bundle, steps=STEPS, sampler="ddim")(images)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    o_map, o_score, o_recon = session.run(["anomaly_map", "pred_score", "reconstruction"],
                                          {"images": images.numpy()})
    assert o_map.shape == (5, 1, SIZE, SIZE) and o_score.shape == (5,) and o_recon.shape == (5, 1, SIZE, SIZE)
    assert np.abs(o_map - amap.numpy()).max() < 1e-4
    assert np.abs(o_recon - recon.numpy()).max() < 1e-4
    assert np.abs(recon.numpy() - images.numpy()).max() > 1e-2  # the graph really reconstructs
    threshold = bundle.threshold["image"]
    torch_labels = (score.numpy() > threshold).tolist()
    assert torch_labels == (o_score > threshold).tolist()
    assert 0 < sum(torch_labels) < len(torch_labels)
    results = Inspector(onnx_path).inspect(list(images.numpy().transpose(0, 2, 3, 1)))
    assert [r["pred_label"] for r in results] == torch_labels
    one = Inspector(onnx_path, batch_size=1).run(images.numpy()[:1])[1]  # batch-independent score
    assert abs(float(one[0]) - float(o_score[0])) < 1e-5


def test_metadata_and_checker(exported):
    bundle_path, onnx_path = exported
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "pred_score", "reconstruction"]
    meta = {p.key: p.value for p in model.metadata_props}
    bundle = load_bundle(bundle_path)
    assert meta["anoddpm_format_version"] == "1" and meta["steps"] == str(STEPS)
    from deploy.integrity import graph_bytes, integrity_hash

    assert meta["integrity_sha256"] == integrity_hash(graph_bytes(onnx_path.read_bytes()), meta)
    assert json.loads(meta["threshold"]) == bundle.threshold
    assert json.loads(meta["fingerprint"]) == bundle.fingerprint
    assert json.loads(meta["preprocessing"]) == {"image_size": SIZE, "channels": 1, "resize_policy": "resize"}
    cfg = Config.from_dict(json.loads(meta["config"]))
    assert cfg.detect.steps == STEPS and cfg.detect.sampler == "ddim" and cfg.model == bundle.cfg.model
    assert not list(onnx_path.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_uncalibrated_bundle_is_refused(tmp_path):
    bundle = _bundle(tmp_path / "model.pt", None)
    with pytest.raises(ValueError, match="anoddpm calibrate"):
        export_onnx(bundle, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_fused_bundle_exports_with_both_references(tmp_path, images):
    """A bundle with a learned head scores with the fused map; its [1, 2, S, S] reference is in the graph."""
    from dataclasses import asdict

    from anoddpm.model.head import build_head

    cfg = (Config().override("model", preset="tiny").override("data", image_size=SIZE)
           .override("detect", map_reference="good_mean", scorer="fused", fusion="geometric").validate())
    plain = load_bundle(_bundle(tmp_path / "plain.pt", None))
    torch.manual_seed(1)
    head = build_head(cfg).state_dict()
    reference = torch.linspace(0.5, 2.0, 2 * SIZE * SIZE).view(1, 2, SIZE, SIZE)
    threshold = {"image": 1.0, "pixel": None, "method": "quantile", "detect": asdict(cfg.detect)}
    path = save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=plain.state_dict, fingerprint={},
                       threshold=None, head_state_dict=head)
    update_threshold(path, threshold, reference)
    detector = Detector.from_bundle(load_bundle(path))
    assert detector.components == ("residual", "head") and detector.reference.has_map_reference
    onnx_path = export_onnx(path, tmp_path / "model.onnx")
    with torch.inference_mode():
        amap, score, _ = detector(images)
        r_map = Detector.from_bundle(load_bundle(path), scorer="residual", map_reference="none")(images)[0]
        h_map = Detector.from_bundle(load_bundle(path), scorer="head", map_reference="none")(images)[0]
    torch.testing.assert_close(amap, (r_map / reference[:, :1] * h_map / reference[:, 1:]).sqrt())
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4


def test_brightness_relative_residual_is_in_the_graph(tmp_path, images):
    """A bundle calibrated with detect.residual_norm brightness exports it: ONNX equals that PyTorch
    detector, not the plain residual's."""
    bundle = _bundle(tmp_path / "model.pt", None)
    update_threshold(bundle, {"image": 1.0, "pixel": None, "method": "quantile",
                              "detect": {"residual_norm": "brightness", "scorer": "residual", "fusion": "max"}})
    assert load_bundle(bundle).cfg.detect.residual_norm == "brightness"
    onnx_path = export_onnx(bundle, tmp_path / "model.onnx")
    with torch.inference_mode():
        relative, score, _ = Detector.from_bundle(load_bundle(bundle))(images)
        plain = Detector.from_bundle(load_bundle(bundle), residual_norm="none")(images)[0]
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - relative[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4
    assert np.abs(o_map - plain[:, 0].numpy()).max() > 1e-3


def test_nearest_good_reference_is_in_the_graph(tmp_path, images):
    """A bundle calibrated with a nearest_good bank exports the neighbour search: ONNX equals PyTorch,
    whose map is the plain map over the mean of the k nearest bank maps."""
    from anoddpm.detection.references import pool_bank_maps, thumbnail_features

    bundle = _bundle(tmp_path / "model.pt", None)
    gen = torch.Generator().manual_seed(5)
    bank_images = torch.rand(12, 1, SIZE, SIZE, generator=gen)
    bank = {"features": thumbnail_features(bank_images),
            "maps": pool_bank_maps(0.5 + torch.rand(12, 1, SIZE, SIZE, generator=gen))}
    update_threshold(bundle, {"image": 1.0, "pixel": None, "method": "quantile", "detect": {"scorer": "residual", "fusion": "max"}}, reference_bank=bank)
    detector = Detector.from_bundle(load_bundle(bundle))
    assert detector.reference.has_reference_bank and detector.cfg.detect.map_reference == "nearest_good"
    onnx_path = export_onnx(bundle, tmp_path / "model.onnx")
    with torch.inference_mode():
        amap, score, _ = detector(images)
        plain = Detector.from_bundle(load_bundle(bundle), map_reference="none")(images)[0]
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4
    assert np.abs(o_map - plain[:, 0].numpy()).max() > 1e-3
    one = Inspector(onnx_path, batch_size=1).run(images.numpy()[:1])[1]  # each image finds its own neighbours
    assert abs(float(one[0]) - float(o_score[0])) < 1e-5
