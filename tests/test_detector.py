"""Detector: shapes, determinism, batch independence, blob sensitivity, bundle loading, ONNX trace."""
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.unet import build_unet
from benchmarks.blur_denoiser import BlurDenoiser
from anoddpm.detection.maps import gaussian_blur

SIZE = 32


def _cfg(**detect):
    detect = {"depth": 50, "steps": 3, "smoothing_sigma": 1.0, "scorer": "residual", **detect}
    return (
        Config()
        .override("data", image_size=SIZE, channels=1)
        .override("model", preset="tiny")
        .override("diffusion", octaves=3, frequency=16.0)
        .override("detect", **detect)
    )


def _randomised_state(cfg):
    unet = build_unet(cfg)
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in unet.state_dict().items()}


def _images(n, seed=0):
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler,samples", [("ddim", 1), ("ddim", 2), ("ancestral", 1)])
def test_shapes_ranges_and_determinism(sampler, samples):
    cfg = _cfg(sampler=sampler, samples=samples, depth=6 if sampler == "ancestral" else 50)
    det = Detector.from_config(cfg, _randomised_state(cfg)).eval()
    images = _images(2)
    with torch.inference_mode():
        amap, score, recon = det(images)
        amap2, score2, _ = det(images)
    assert amap.shape == (2, 1, SIZE, SIZE) and score.shape == (2,) and recon.shape == (2, 1, SIZE, SIZE)
    assert recon.min() >= 0 and recon.max() <= 1
    torch.testing.assert_close(score, score2, rtol=0, atol=0)
    torch.testing.assert_close(amap, amap2, rtol=0, atol=0)
    assert score.min() > 0


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_score_does_not_depend_on_batch_composition(sampler):
    cfg = _cfg(sampler=sampler, depth=6 if sampler == "ancestral" else 50)
    det = Detector.from_config(cfg, _randomised_state(cfg)).eval()
    images = _images(3)
    with torch.inference_mode():
        _, batch_scores, _ = det(images)
        _, alone, _ = det(images[1:2])
        _, other, _ = det(torch.cat([_images(2, seed=5), images[1:2]]))
    torch.testing.assert_close(alone[0], batch_scores[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(other[2], batch_scores[1], atol=1e-6, rtol=1e-5)


def test_detection_noise_fixed_by_seed():
    a, b, c = (Detector.from_config(_cfg(seed=s)) for s in (0, 0, 1))
    torch.testing.assert_close(a.reconstructor.detection_noise, b.reconstructor.detection_noise, rtol=0, atol=0)
    assert (a.reconstructor.detection_noise - c.reconstructor.detection_noise).abs().max() > 0.1
    assert a.reconstructor.detection_noise.std().item() == pytest.approx(1.0, abs=0.05)  # standardised simplex


@pytest.mark.parametrize("residual", ["l2", "ssim"])
def test_blob_raises_score_with_smoothing_model(residual):
    cfg = _cfg(depth=20, steps=2, residual=residual)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    det = Detector(BlurDenoiser(diffusion, 3.0), diffusion, cfg).eval()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    good = (0.3 + 0.4 * xx / SIZE).float().view(1, 1, SIZE, SIZE)
    bad = good.clone()
    bad[..., 10:14, 18:22] = 1.0
    with torch.inference_mode():
        amap, scores, _ = det(torch.cat([good, bad]))
    assert scores[1] > 3 * scores[0]
    peak = np.unravel_index(amap[1, 0].argmax().item(), (SIZE, SIZE))
    assert 8 <= peak[0] <= 15 and 16 <= peak[1] <= 23


def test_from_bundle_applies_overrides_and_weights():
    cfg = _cfg()
    state = _randomised_state(cfg)
    det = Detector.from_bundle(SimpleNamespace(cfg=cfg, state_dict=state), "cpu", steps=2, residual=None)
    assert det.cfg.detect.steps == 2 and det.cfg.detect.residual == "l2" and not det.training
    torch.testing.assert_close(det.unet.state_dict()["input_conv.weight"], state["input_conv.weight"])
    with pytest.raises(ValueError, match="detect.steps"):
        Detector.from_bundle(SimpleNamespace(cfg=cfg, state_dict=state), "cpu", steps=500)


def test_map_reference_divides_the_map_unless_turned_off():
    cfg = _cfg(map_reference="good_mean")
    state = _randomised_state(cfg)
    size = cfg.data.image_size
    reference = torch.linspace(0.5, 2.0, size * size).view(1, 1, size, size)
    images = torch.rand(2, cfg.data.channels, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain_map, _, _ = Detector.from_bundle(SimpleNamespace(cfg=cfg, state_dict=state), "cpu")(images)
        bundle = SimpleNamespace(cfg=cfg, state_dict=state, map_reference=reference,
                                 threshold={"image": 1.0, "detect": asdict(cfg.detect)})
        with_ref = Detector.from_bundle(bundle, "cpu")
        amap, score, _ = with_ref(images)
        off = Detector.from_bundle(bundle, "cpu", map_reference="none")(images)[0]
        other_settings = Detector.from_bundle(bundle, "cpu", depth=cfg.detect.depth // 2)
    torch.testing.assert_close(amap, plain_map / reference)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))
    torch.testing.assert_close(off, plain_map)
    assert with_ref.reference.has_map_reference and not other_settings.reference.has_map_reference  # fitted for other settings
    with pytest.raises(ValueError, match="positive"):
        with_ref.load_fitted_state({"map_reference": torch.zeros(size, size)})


def test_onnx_trace_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = _cfg(steps=2, residual="ssim", score="topk", topk=10)
    det = Detector.from_config(cfg, _randomised_state(cfg)).eval()
    path = tmp_path / "det.onnx"
    torch.onnx.export(
        det, (_images(2),), str(path), dynamo=False, opset_version=17, input_names=["images"],
        output_names=["anomaly_map", "pred_score", "reconstruction"],
        dynamic_axes={n: {0: "batch"} for n in ("images", "anomaly_map", "pred_score", "reconstruction")},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(3, seed=7)
    amap, score, recon = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        t_amap, t_score, t_recon = det(images)
    np.testing.assert_allclose(recon, t_recon.numpy(), atol=1e-4)
    np.testing.assert_allclose(score, t_score.numpy(), atol=1e-4, rtol=1e-3)


def _head_state(cfg):
    from anoddpm.model.head import build_head

    torch.manual_seed(3)
    return build_head(cfg).state_dict()


def test_head_scorer_maps_are_the_smoothed_head_probability():
    cfg = _cfg(scorer="head")
    state, head_state = _randomised_state(cfg), _head_state(cfg)
    det = Detector.from_config(cfg, state, head_state).eval()
    plain = Detector.from_config(cfg.override("detect", scorer="residual"), state, head_state).eval()
    assert det.head is not None and plain.head is None
    images = _images(2)
    with torch.inference_mode():
        amap, score, recon = det(images)
        p_amap, _, p_recon = plain(images)
        expected = gaussian_blur(det.head.anomaly_map(images, recon), cfg.detect.smoothing_sigma)
    torch.testing.assert_close(recon, p_recon, rtol=0, atol=0)
    torch.testing.assert_close(amap, expected, rtol=0, atol=0)
    torch.testing.assert_close(score, amap.flatten(1).amax(1), rtol=0, atol=0)
    assert 0 <= amap.min() and amap.max() <= 1
    assert (amap - p_amap).abs().max() > 1e-3


def test_head_scorer_without_head_is_refused_and_auto_falls_back():
    cfg = _cfg(scorer="auto")
    state = _randomised_state(cfg)
    for scorer in ("head", "fused"):
        with pytest.raises(ValueError, match=f"detect.scorer='{scorer}'"):
            Detector.from_bundle(SimpleNamespace(cfg=cfg, state_dict=state), "cpu", scorer=scorer)
    plain = Detector.from_bundle(SimpleNamespace(cfg=cfg, state_dict=state), "cpu")
    assert plain.head is None and plain.components == ("residual", "feature_memory")
    with_head = SimpleNamespace(cfg=cfg, state_dict=state, head_state_dict=_head_state(cfg))
    auto = Detector.from_bundle(with_head, "cpu")
    assert auto.head is not None and auto.components == ("residual", "head", "feature_memory")
    assert Detector.from_bundle(with_head, "cpu", scorer="head").components == ("head",)


def test_fused_map_is_the_geometric_mean_of_both_maps_each_over_its_own_reference():
    """(ONNX parity of a fused bundle: tests/test_export.py.)"""
    from anoddpm.detection.calibration import fit_and_score_good
    from anoddpm.detection.tiling import inspection_detector
    from eval.threshold import MIN_REFERENCE_IMAGES, held_out_normalised, reference_map

    cfg = _cfg(scorer="fused", fusion="geometric", map_reference="good_mean")
    state, head_state = _randomised_state(cfg), _head_state(cfg)
    fused = Detector.from_config(cfg, state, head_state).eval()
    residual, head = (Detector(fused.unet, fused.diffusion, cfg.override("detect", scorer=name), fused.head).eval()
                      for name in ("residual", "head"))
    good = _images(MIN_REFERENCE_IMAGES + 2, seed=11)
    scored = fit_and_score_good(inspection_detector(fused, 3), good, torch.device("cpu"), batch_size=3)
    images = _images(3, seed=12)
    with torch.inference_mode():
        r_good, h_good = residual(good)[0][:, 0].numpy(), head(good)[0][:, 0].numpy()
        r_map, h_map = residual(images)[0], head(images)[0]
        amap, score, _ = fused(images)
    reference = np.stack([reference_map(r_good), reference_map(h_good)])[None]
    np.testing.assert_allclose(fused.reference.map_reference.numpy(), reference, rtol=1e-5)
    r_part, h_part = r_map / torch.from_numpy(reference[:, :1]), h_map / torch.from_numpy(reference[:, 1:])
    torch.testing.assert_close(amap, (r_part * h_part).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))
    assert scored.maps.shape == (len(good), SIZE, SIZE) and np.isfinite(scored.scores).all()
    # calibration scores held-back images with references fitted without them, combined the same way
    r_held, h_held = held_out_normalised(r_good), held_out_normalised(h_good)
    np.testing.assert_allclose(scored.maps, np.sqrt(r_held * h_held), rtol=1e-5, atol=1e-7)
    with torch.inference_mode():  # both maps come from one reconstruction, before any reference
        components, reconstruction = fused.component_maps(images)
    torch.testing.assert_close(components, torch.cat([r_map, h_map], dim=1))
    torch.testing.assert_close(reconstruction, fused(images)[2])
