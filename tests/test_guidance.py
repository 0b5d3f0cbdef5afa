"""detect.guidance (--guidance W): DDAD's input-guided reverse steps, in torch and in the ONNX graph."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.model.unet import build_unet
from deploy.export import export_module, onnx_metadata

SIZE = 32


class ZeroEps(nn.Module):
    """A denoiser that predicts no noise: what guidance alone does is then visible in closed form."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_guided_eps_is_ddad_correction():
    diffusion = GaussianDiffusion.from_config(Config().diffusion)
    gen = torch.Generator().manual_seed(0)
    x_t, eps, x_in = (torch.randn(2, 1, 4, 4, generator=gen) for _ in range(3))
    t, w = 40, 1.5
    a = diffusion.alphas_cumprod[t].float()
    y_t = a.sqrt() * x_in + (1 - a).sqrt() * eps
    expected = eps - (1 - a).sqrt() * w * (y_t - x_t)
    torch.testing.assert_close(diffusion.guided_eps(x_t, eps, t, x_in, w), expected)
    assert torch.equal(diffusion.guided_eps(x_t, eps, t, x_in, 0.0), eps)


@pytest.mark.parametrize("depth, steps, gain", [(50, 1, 0.97), (250, 5, 0.7)])
def test_guidance_pulls_the_reconstruction_toward_the_input(depth, steps, gain):
    """The pull scales with W (1 - alpha_bar_t): small at the default depth 50, strong from depth 250."""
    diffusion = GaussianDiffusion.from_config(Config().diffusion)
    gen = torch.Generator().manual_seed(1)
    x_start = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(x_start.shape, generator=gen)
    errors = []
    for w in (0.0, 1.0, 2.0):
        rebuilt = partial_diffusion_reconstruct(ZeroEps(), diffusion, x_start, depth, steps, "ddim", noise,
                                                guidance=w)
        errors.append(float((rebuilt - x_start).abs().mean()))
    assert errors[0] > errors[1] > errors[2]  # the denoiser is useless; only guidance brings the input back
    assert errors[2] < gain * errors[0]


def _detector(guidance: float) -> Detector:
    cfg = (Config().override("model", preset="tiny").override("data", image_size=SIZE)
           .override("detect", scorer="residual", map_reference="none", steps=3, guidance=guidance).validate())
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in build_unet(cfg).state_dict().items()}
    return Detector.from_config(cfg, state).eval()


def test_guided_detector_is_batch_invariant_and_differs_from_unguided():
    images = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    guided, plain = _detector(2.0), _detector(0.0)
    with torch.inference_mode():
        together = guided(images)[1]
        alone = torch.cat([guided(images[i:i + 1])[1] for i in range(4)])
        unguided = plain(images)[1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert float((together - unguided).abs().max()) > 1e-4


def test_guided_graph_matches_torch_in_onnxruntime(tmp_path):
    detector = _detector(2.0)

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            amap, score, _ = self.detector(images)
            return amap, score

    path = export_module(Graph(), tmp_path / "guided.onnx", channels=1, image_size=SIZE,
                         metadata=onnx_metadata(detector.cfg, {"image": 1.0, "pixel": None}, {"source": "test"}))
    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    amap, score = session.run(None, {"images": images.numpy()})
    with torch.inference_mode():
        t_map, t_score, _ = detector(images)
    np.testing.assert_allclose(amap, t_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(score, t_score.numpy(), atol=1e-4)


def test_guidance_is_a_detection_setting_a_threshold_belongs_to():
    from anoddpm.detection.settings import describe_differences, detect_differences

    stored = {"guidance": 0.0, "depth": 50}
    assert detect_differences(stored, {"guidance": 2.0, "depth": 50}) == ["guidance"]
    assert describe_differences(stored, {"guidance": 2.0, "depth": 50}) == "--guidance 0.0 -> 2.0"
    assert detect_differences({"depth": 50}, {"guidance": 0.0, "depth": 50}) == []  # older thresholds: unguided
