"""anoddpm info: a bundle and an ONNX file describe their config, threshold and fingerprint."""
from __future__ import annotations

import json

import pytest
import torch

from anoddpm.bundle import save_bundle, update_threshold
from anoddpm.cli import main as cli
from anoddpm.config import Config
from anoddpm.model.unet import build_unet


@pytest.fixture()
def bundle(tmp_path):
    cfg = (Config().override("model", preset="tiny").override("data", image_size=32)
           .override("detect", scorer="residual").validate())
    threshold = {"image": 0.25, "pixel": 0.5, "method": "quantile", "quantile": 0.99, "n_good": 7}
    return save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=build_unet(cfg).state_dict(),
                       fingerprint={"sha256": "abc", "n_train": 3}, threshold=threshold), cfg


def test_info_bundle_and_onnx(bundle, tmp_path, capsys):
    path, cfg = bundle
    assert cli(["info", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "bundle"
    assert out["threshold"]["image"] == 0.25
    assert out["fingerprint"]["sha256"] == "abc"
    assert out["config"] == cfg.to_dict()
    assert out["parameters"] == sum(p.numel() for p in build_unet(cfg).parameters())
    assert out["map_reference"] is None
    assert out["head_parameters"] is None
    assert out["calibration_problem"] is None and len(out["threshold"]["calibration_sha256"]) == 64

    update_threshold(path, {"image": 0.25, "pixel": 0.5, "detect": {"scorer": "residual", "fusion": "max"}}, torch.full((1, 1, 32, 32), 2.0))  # default settings
    assert cli(["info", str(path)]) == 0
    described = json.loads(capsys.readouterr().out)["map_reference"]
    assert described == {"shape": [1, 1, 32, 32], "min": 2.0, "mean": 2.0, "max": 2.0}

    onnx_path = tmp_path / "model.onnx"
    assert cli(["export", "--model", str(path), "--out", str(onnx_path), "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli(["info", str(onnx_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "onnx"
    assert out["threshold"]["image"] == 0.25
    assert out["preprocessing"] == {"image_size": 32, "channels": 1, "resize_policy": cfg.data.resize_policy}
    assert set(out["outputs"]) >= {"anomaly_map", "pred_score"}


def test_info_missing_and_corrupt_files(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    assert cli(["info", str(bad)]) == 2
    assert "bad.onnx" in capsys.readouterr().err


def test_info_counts_the_scoring_head(tmp_path, capsys):
    from anoddpm.model.head import build_head

    cfg = (Config().override("model", preset="tiny").override("data", image_size=32)
           .override("detect", scorer="residual").validate())
    head = build_head(cfg)
    path = save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=build_unet(cfg).state_dict(),
                       fingerprint={"sha256": "abc"}, head_state_dict=head.state_dict())
    assert cli(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["head_parameters"] == sum(p.numel() for p in head.parameters())
