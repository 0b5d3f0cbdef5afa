"""Damaged, altered or mistaken model files are refused on load with one line naming the file (issue 21)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.cli import main
from anoddpm.detection.detector import Detector
from anoddpm.model.unet import build_unet
from deploy.runtime import Inspector
from onnx_toy import make_toy_onnx, with_metadata
from test_evaluate_cli import tiny_config


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    return save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=build_unet(cfg).state_dict(), fingerprint={})


def _rewrite(path: Path, change) -> Path:
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)
    return path


def test_flipped_bytes_inside_the_weights_are_refused(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    data = bytearray(bundle.read_bytes())
    start = data.find(b"data/0")  # the first tensor's record; its bytes follow the local header
    for i in range(start + 200, start + 300):
        data[i] ^= 0xFF
    bundle.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.pt is corrupted: the checksum of .*data/\d+ does not match"):
        load_bundle(bundle)
    assert main(["info", str(bundle)]) == 2
    assert "corrupted" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["state_dict"].update({"input_conv.weight": torch.zeros(3, 3)}), "weights do not fit its config"),
    (lambda raw: raw["state_dict"].pop("input_conv.weight"), "weights do not fit its config"),
    (lambda raw: raw.update(state_dict=[1, 2]), "state_dict is not a mapping of weight names to tensors"),
    (lambda raw: raw.update(head_state_dict={"w": 1}), "head_state_dict is not a mapping"),
])
def test_altered_weights_are_refused_with_a_message(bundle: Path, change, message: str) -> None:
    _rewrite(bundle, change)
    with pytest.raises(ValueError, match=message):
        Detector.from_bundle(load_bundle(bundle))


def test_mistaken_model_files_get_messages_that_say_what_to_do(bundle: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    onnx_path = make_toy_onnx(tmp_path / "m.onnx")
    assert main(["export", "--model", str(onnx_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "is an exported ONNX model, not an anoddpm bundle; give the model.pt" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "is a folder; pass the model.pt or .onnx file in it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder; pass the bundle file in it"):
        load_bundle(tmp_path)
    assert main(["inspect", "--model", str(bundle), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is a PyTorch bundle (model.pt), not an ONNX model; export it first" in capsys.readouterr().err
    assert main(["export", "--model", str(bundle), "--out", str(tmp_path)]) == 2
    assert "is a folder; give the .onnx file" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"config": "[" * 100_000 + "]" * 100_000}, "metadata is not valid"),
    ({"preprocessing": "[32, 1]"}, "'preprocessing' must be a JSON object"),
    ({"preprocessing": json.dumps({"image_size": "abc", "channels": 1, "resize_policy": "resize"})},
     r"preprocessing\.image_size='abc' must be an integer"),
    ({"preprocessing": json.dumps({"image_size": 64, "channels": 1, "resize_policy": "resize"})},
     r"metadata describes input \[B, 1, 64, 64\] but the graph takes"),
])
def test_onnx_metadata_is_checked_when_the_model_loads(tmp_path: Path, values: dict, message: str) -> None:
    good = make_toy_onnx(tmp_path / "m.onnx")
    Inspector(good)
    with pytest.raises(ValueError, match=message):
        Inspector(with_metadata(good, tmp_path / "bad.onnx", **values))
