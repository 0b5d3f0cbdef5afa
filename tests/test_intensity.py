"""anoddpm/intensity.py: per-image intensity normalisation in training, the detector and the ONNX graph."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from anoddpm.bundle import save_bundle
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.intensity import SPAN, denormalise, intensity_stats, model_inputs, normalise
from anoddpm.model.unet import build_unet
from deploy.export import export_onnx

SIZE = 32


def _images(n: int = 4) -> torch.Tensor:
    return 0.3 + 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _random_detector_state(cfg: Config) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in build_unet(cfg).state_dict().items()}


def _cfg(intensity: str) -> Config:
    return (Config().override("model", preset="tiny").override("data", image_size=SIZE, intensity=intensity)
            .override("detect", depth=20, scorer="residual").validate())


def test_normalised_images_have_mean_half_and_std_one_over_span_and_round_trip():
    x = _images()
    stats = intensity_stats(x, "per_image")
    n = normalise(x, stats)
    assert torch.allclose(n.mean(dim=(1, 2, 3)), torch.full((4,), 0.5), atol=1e-5)
    assert torch.allclose(n.flatten(1).std(dim=1), torch.full((4,), 1 / SPAN), atol=1e-5)
    assert torch.allclose(denormalise(n, stats), x, atol=1e-6)
    target, seen = model_inputs(x * 0.9, x, "none")
    assert torch.equal(seen, x * 2 - 1) and torch.equal(target, x * 0.9 * 2 - 1)
    with pytest.raises(ValueError, match="data.intensity"):
        intensity_stats(x, "global")


def test_per_image_detector_ignores_brightness_and_contrast():
    x = _images()
    darker = 0.5 * x + 0.1  # another exposure of the same scene
    cfg = _cfg("per_image")
    det = Detector.from_config(cfg, _random_detector_state(cfg)).eval()
    with torch.inference_mode():
        (map_a, score_a, rec_a), (map_b, score_b, rec_b) = det(x), det(darker)
    assert (rec_a - x).abs().max() > 1e-2  # the detector really reconstructs
    assert torch.allclose(map_a, map_b, rtol=1e-3, atol=1e-6) and torch.allclose(score_a, score_b, rtol=1e-3)
    assert torch.allclose(rec_b, 0.5 * rec_a + 0.1, atol=1e-4)  # returned in the input's grey levels


def test_onnx_graph_carries_the_normalisation(tmp_path):
    cfg = _cfg("per_image")
    bundle = save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=_random_detector_state(cfg),
                         fingerprint={"source": "random", "n": 0},
                         threshold={"image": 1.0, "pixel": None, "method": "quantile",
                                    "detect": cfg.to_dict()["detect"]})
    onnx_path = export_onnx(bundle, tmp_path / "model.onnx")
    x = torch.cat([_images(2), 0.5 * _images(2) + 0.1])
    with torch.inference_mode():
        amap, score, _ = Detector.from_config(cfg, _random_detector_state(cfg)).eval()(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    o_map, o_score = session.run(["anomaly_map", "pred_score"], {"images": x.numpy()})
    assert np.abs(o_map - amap.numpy()).max() < 1e-4 * float(amap.max())
    assert np.allclose(o_score, score.numpy(), rtol=1e-4)
