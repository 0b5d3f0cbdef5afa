"""UNet: shapes, presets + overrides, timestep sensitivity, ONNX export with dynamic batch."""
import numpy as np
import pytest
import torch

from anoddpm.config import Config
from anoddpm.model.unet import PRESETS, build_unet, resolve_architecture, timestep_embedding


def _cfg(channels=1, size=32, **model):
    return Config().override("model", preset="tiny", **model).override("data", channels=channels, image_size=size)


def _randomised(model):
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if not p.data.any():  # zero-initialised output layers
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model.eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape_and_zero_init(channels):
    model = build_unet(_cfg(channels))
    x = torch.randn(2, channels, 32, 32)
    eps = model(x, torch.tensor([0.0, 999.0]))
    assert eps.shape == (2, channels, 32, 32)
    assert eps.abs().max().item() == 0.0  # zero-initialised output conv


def test_preset_sizes():
    count = lambda cfg: sum(p.numel() for p in build_unet(cfg).parameters())  # noqa: E731
    assert count(_cfg()) < 1_000_000
    assert 2_000_000 < count(Config().override("data", image_size=128)) < 5_000_000  # default preset: small
    arch = PRESETS["paper"]
    assert (arch.base_channels, arch.channel_mults, arch.num_res_blocks) == (128, (1, 1, 2, 2, 4, 4), 2)
    assert arch.attention_resolutions == (32, 16, 8)


def test_overrides_win_over_preset():
    arch = resolve_architecture(_cfg(base_channels=8, channel_mults=[1, 2]))
    assert arch.base_channels == 8 and arch.channel_mults == (1, 2)
    assert arch.num_res_blocks == PRESETS["tiny"].num_res_blocks


def test_bad_image_size_names_parameter():
    with pytest.raises(ValueError, match="image_size"):
        build_unet(_cfg(size=36, channel_mults=[1, 2, 2, 2]))


def test_timestep_changes_output_and_batch_items_are_independent():
    model = _randomised(build_unet(_cfg()))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0, 10.0]))
        b = model(x, torch.tensor([10.0, 500.0, 10.0]))
        single = model(x[2:], torch.tensor([10.0]))
    assert (a[1] - b[1]).abs().max() > 1e-3
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(single[0], a[2], atol=1e-5, rtol=1e-5)


def test_timestep_embedding_golden():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    # freqs = [1, 1e-2]; emb = [cos(t f), sin(t f)]
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [np.cos(1.0), np.cos(0.01), np.sin(1.0), np.sin(0.01)]])
    torch.testing.assert_close(emb, expected.float())


def test_onnx_export_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _randomised(build_unet(_cfg()))
    path = tmp_path / "unet.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 1, 32, 32), torch.tensor([3.0, 500.0])), str(path), dynamo=False, opset_version=17,
        input_names=["x", "t"], output_names=["eps"], dynamic_axes={"x": {0: "b"}, "t": {0: "b"}, "eps": {0: "b"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([1.0, 2.0, 999.0])
    (out,) = session.run(None, {"x": x.numpy(), "t": t.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x, t).numpy(), atol=1e-5)
