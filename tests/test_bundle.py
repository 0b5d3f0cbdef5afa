"""model.pt round trip, safe loading and atomic writes."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from anoddpm.version import BUNDLE_FORMAT_VERSION
from anoddpm.platform.atomic import append_jsonl, atomic_torch_save, atomic_write_text
from anoddpm.bundle import calibration_fingerprint, load_bundle, save_bundle, update_threshold
from anoddpm.config import Config


def _cfg() -> Config:
    return Config().override("data", image_size=32).override("model", preset="tiny").override("detect", depth=100)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def test_round_trip_keeps_config_weights_and_metadata(tmp_path):
    path = tmp_path / "model.pt"
    fingerprint = {"n_train": 12, "hash": "abc", "root": tmp_path}
    save_bundle(path, cfg=_cfg(), state_dict=_weights(), fingerprint=fingerprint,
                threshold={"image": np.float32(0.25), "pixel": None})
    raw = torch.load(path, weights_only=True)  # must not need pickle of custom objects
    assert raw["format_version"] == BUNDLE_FORMAT_VERSION
    assert raw["preprocessing"] == {"image_size": 32, "channels": 1, "resize_policy": "resize"}
    assert raw["noise"]["kind"] == _cfg().diffusion.noise == "gaussian"
    b = load_bundle(path)
    assert b.cfg == _cfg()
    assert b.fingerprint == {"n_train": 12, "hash": "abc", "root": str(tmp_path)}
    assert {k: v for k, v in b.threshold.items() if k != "calibration_sha256"} == {"image": pytest.approx(0.25),
                                                                                  "pixel": None}
    assert b.threshold["calibration_sha256"] == calibration_fingerprint(raw)  # sealed to what it is stored with
    assert b.versions["torch"] == torch.__version__
    for k, v in _weights().items():
        assert torch.equal(b.state_dict[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


def test_update_threshold_keeps_weights(tmp_path):
    path = tmp_path / "model.pt"
    save_bundle(path, cfg=_cfg(), state_dict=_weights(), fingerprint={})
    assert load_bundle(path).threshold is None
    update_threshold(path, {"image": 1.5, "method": "quantile"})
    b = load_bundle(path)
    assert b.threshold == {"image": 1.5, "method": "quantile",
                           "calibration_sha256": calibration_fingerprint(torch.load(path, weights_only=True))}
    assert torch.equal(b.state_dict["conv.bias"], _weights()["conv.bias"])


@pytest.mark.parametrize("keep", [0, 10, 200, -40])
def test_truncated_bundle_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "model.pt"
    save_bundle(path, cfg=_cfg(), state_dict=_weights(), fingerprint={})
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=r"model\.pt is not a readable anoddpm bundle \(truncated or corrupted\?\)"):
        load_bundle(path)


class _Evil:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_is_not_executed(tmp_path, legacy):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"format_version": 1, "config": _Evil(str(sentinel))}
    if legacy:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match="model.pt"):
        load_bundle(path)
    assert not sentinel.exists()


def test_missing_and_newer_format_version_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": {}}, path)
    with pytest.raises(ValueError, match="no format_version"):
        load_bundle(path)
    save_bundle(path, cfg=_cfg(), state_dict=_weights(), fingerprint={})
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = BUNDLE_FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(ValueError, match="newer than this anoddpm"):
        load_bundle(path)


def test_missing_bundle_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_bundle(tmp_path / "nope.pt")


def test_atomic_writes_replace_and_append(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["x"], torch.arange(3))
    append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    append_jsonl(tmp_path / "log.jsonl", {"step": 2})
    assert (tmp_path / "log.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt"]


def test_head_weights_round_trip_and_are_optional(tmp_path):
    head = {"out.weight": torch.arange(4.0).view(1, 4, 1, 1)}
    save_bundle(tmp_path / "with.pt", cfg=_cfg(), state_dict=_weights(), fingerprint={}, head_state_dict=head)
    save_bundle(tmp_path / "without.pt", cfg=_cfg(), state_dict=_weights(), fingerprint={})
    assert "head_state_dict" not in torch.load(tmp_path / "without.pt", weights_only=True)
    assert load_bundle(tmp_path / "without.pt").head_state_dict is None
    loaded = load_bundle(tmp_path / "with.pt").head_state_dict
    assert torch.equal(loaded["out.weight"], head["out.weight"])
    update_threshold(tmp_path / "with.pt", {"image": 0.5})
    assert torch.equal(load_bundle(tmp_path / "with.pt").head_state_dict["out.weight"], head["out.weight"])
