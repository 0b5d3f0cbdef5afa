"""anoddpm.api: load a bundle or an ONNX file, predict paths / PIL images / arrays, torch == ONNX."""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anoddpm
from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.data.imageio import array_image, preprocess, restore_map, save_png
from anoddpm.model.unet import build_unet
from deploy.export import export_onnx
from onnx_toy import defect_image, make_toy_onnx

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _cfg(policy: str = "resize") -> Config:
    return (Config().override("model", preset="tiny").override("data", image_size=SIZE, resize_policy=policy)
            .override("detect", steps=2, scorer="residual").validate())


def _bundle(path: Path, threshold: dict | None, policy: str = "resize") -> Path:
    cfg = _cfg(policy)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in build_unet(cfg).state_dict().items()}
    return save_bundle(path, cfg=cfg, state_dict=state, fingerprint={"source": "random"}, threshold=threshold)


def _images() -> list[np.ndarray]:
    """Four grey float images [48, 40] in [0, 1]: smooth ones and ones with a bright square."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:48, 0:40].astype(np.float32)
    out = []
    for i in range(4):
        img = 0.3 + 0.2 * yy / 48 + 0.1 * xx / 40 + 0.02 * rng.random((48, 40)).astype(np.float32)
        if i % 2:
            img[18:30, 12:24] = 0.95
        out.append(np.clip(img, 0, 1).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, float]:
    """(calibrated bundle, its ONNX export, image threshold between the good and the defect images' scores)."""
    tmp = tmp_path_factory.mktemp("api")
    raw = _bundle(tmp / "model.pt", None)
    batch = torch.from_numpy(np.stack([preprocess(x, SIZE, "resize") for x in _images()]))
    with torch.inference_mode():
        scores = Detector.from_bundle(load_bundle(raw))(batch)[1].sort().values
    image_t = float(scores[1:3].mean())
    threshold = {"image": image_t, "pixel": None, "method": "quantile", "detect": asdict(_cfg().detect)}
    bundle = _bundle(tmp / "model.pt", threshold)
    return bundle, export_onnx(bundle, tmp / "model.onnx"), image_t


def test_bundle_and_onnx_agree_on_every_input_kind(models, tmp_path):
    bundle, onnx_path, image_t = models
    images = _images()
    png = tmp_path / "part.png"
    save_png(png, images[1])
    as_uint8 = np.round(images[1] * 255).astype(np.uint8)  # what the PNG holds
    inputs = [str(png), png, Image.open(png), as_uint8, as_uint8[..., None], as_uint8.astype(np.float32) / 255]
    torch_model, onnx_model = anoddpm.load(bundle, device="cpu"), anoddpm.load(onnx_path)
    assert torch_model.image_threshold == onnx_model.image_threshold == pytest.approx(image_t)
    by_torch, by_onnx = torch_model.predict(inputs), onnx_model.predict(inputs)
    assert len(by_torch) == len(by_onnx) == len(inputs)
    for a, b in zip(by_torch, by_onnx):
        assert a.anomaly_map.shape == b.anomaly_map.shape == (48, 40)
        assert a.pred_mask.shape == (48, 40) and a.pred_mask.dtype == bool
        assert a.pred_score == pytest.approx(b.pred_score, rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-3, atol=1e-5)
        assert a.pred_label == b.pred_label
        np.testing.assert_array_equal(a.pred_mask, a.anomaly_map > torch_model.pixel_threshold)
    # the same pixels, however they arrive, give the same score
    np.testing.assert_allclose([p.pred_score for p in by_torch], by_torch[0].pred_score, rtol=1e-6)
    assert by_torch[0].path == str(png) and by_torch[3].path is None


def test_labels_follow_the_threshold_and_batching_does_not_matter(models):
    bundle, onnx_path, image_t = models
    images = _images()
    one_by_one = [anoddpm.load(bundle, device="cpu", batch_size=1).predict(x) for x in images]
    together = anoddpm.load(bundle, device="cpu", batch_size=3).predict(images)
    np.testing.assert_allclose([p.pred_score for p in one_by_one], [p.pred_score for p in together], atol=1e-6)
    labels = [p.pred_label for p in together]
    assert labels == [p.pred_score > image_t for p in together]
    assert sum(labels) == 2  # the threshold sits between the two lowest and the two highest scores
    stacked = anoddpm.load(onnx_path).predict(np.stack(images)[..., None])  # [B, H, W, C] array = a batch
    assert [p.pred_label for p in stacked] == labels


def test_uncalibrated_or_mismatched_bundle_gives_no_verdict(tmp_path, caplog):
    image = _images()[1]
    with caplog.at_level(logging.WARNING, logger="anoddpm.api"):
        result = anoddpm.load(_bundle(tmp_path / "raw.pt", None), device="cpu").predict(image)
    assert "no threshold" in caplog.text
    assert result.pred_label is None and result.pred_mask is None and result.anomaly_map.shape == (48, 40)
    other = {"image": 0.01, "pixel": None, "method": "quantile", "detect": {**asdict(_cfg().detect), "depth": 7}}
    result = anoddpm.load(_bundle(tmp_path / "other.pt", other), device="cpu").predict(image)
    assert result.pred_label is None and result.pred_score > 0


def test_restore_map_inverts_each_resize_policy():
    # a 20 x 40 image at 32 px: pad scales to 16 x 32 and pads 8 rows above and below
    amap = np.full((32, 32), 5.0, np.float32)
    amap[8:24] = 1.0
    np.testing.assert_allclose(restore_map(amap, (20, 40), "pad"), 1.0)
    # crop scales to 32 x 64 and keeps columns 16..47: the cropped-away columns get 0
    restored = restore_map(np.ones((32, 32), np.float32), (20, 40), "crop")
    assert restored.shape == (20, 40)
    assert restored[:, :8].max() == 0.0 and restored[:, 12:28].min() == pytest.approx(1.0)
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    restored = restore_map(ramp, (16, 64), "resize")
    assert restored.shape == (16, 64) and np.all(np.diff(restored[0]) >= 0)


def test_padded_bundle_returns_maps_without_the_padding(tmp_path):
    threshold = {"image": 1e9, "pixel": None, "method": "quantile", "detect": asdict(_cfg("pad").detect)}
    result = anoddpm.load(_bundle(tmp_path / "pad.pt", threshold, "pad"), device="cpu").predict(_images()[1])
    assert result.anomaly_map.shape == (48, 40) and result.pred_label is False and not result.pred_mask.any()


def test_array_image_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        array_image(np.full((4, 4), 255.0), 1)
    with pytest.raises(ValueError, match="dtype int64"):
        array_image(np.zeros((4, 4), np.int64), 1)
    with pytest.raises(ValueError, match="shape"):
        array_image(np.zeros((4, 4, 2), np.uint8), 1)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 1] = 255
    np.testing.assert_allclose(array_image(rgba, 1), 0.587, atol=1e-6)  # alpha dropped, RGB -> luminance


def test_missing_file_is_named(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        anoddpm.load(models[1]).predict([_images()[0], tmp_path / "nope.png"])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        anoddpm.load(tmp_path / "missing.onnx")


def test_onnx_path_never_imports_torch(tmp_path):
    onnx_path = make_toy_onnx(tmp_path / "toy.onnx")
    code = ("import sys, numpy as np, anoddpm\n"
            f"r = anoddpm.load({str(onnx_path)!r}).predict(np.zeros((40, 48), np.uint8))\n"
            "assert r.anomaly_map.shape == (40, 48), r.anomaly_map.shape\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(r.pred_label)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert anoddpm.load(onnx_path).predict(defect_image()).pred_label is True
