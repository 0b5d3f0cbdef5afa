"""deploy/quantize.py: `anoddpm export --quantize int8` quantises the networks, keeps its own threshold, runs on the line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from anoddpm.bundle import load_bundle
from anoddpm.cli import main as cli
from anoddpm.data.datasets import load_test_set, load_training_data
from deploy.export import export_onnx
from deploy import quantize
from deploy.quantize import QUANTIZED_SCOPES, good_scores
from deploy.runtime import Inspector


@pytest.fixture(scope="module")
def exported(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle, float ONNX, INT8 ONNX) of a tiny model trained on the synthetic set (feature memory included); the
    quality check is passed whatever the loss (a 4-step model is no measure of it; see test_quality_loss_...)."""
    tmp = tmp_path_factory.mktemp("int8")
    patch = pytest.MonkeyPatch()
    patch.setattr(quantize, "QUALITY_TOLERANCE", 1.0)
    assert cli(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(tmp / "run"),
                "--image-size", "32", "--preset", "tiny", "--max-steps", "4", "--batch-size", "4", "--no-head",
                "--device", "cpu", "-q"]) == 0
    bundle = tmp / "run" / "model.pt"
    assert cli(["export", "--model", str(bundle), "--out", str(tmp / "float.onnx"), "-q"]) == 0
    assert cli(["export", "--model", str(bundle), "--out", str(tmp / "int8.onnx"), "--quantize", "int8",
                "--triton", str(tmp / "repo"), "-q"]) == 0
    patch.undo()
    return bundle, tmp / "float.onnx", tmp / "int8.onnx"


def _weights_of_conv(model: onnx.ModelProto) -> dict[str, int]:
    """Conv node name -> element type of the initializer its weight comes from (through a DequantizeLinear)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]
            if weight in producers and producers[weight].op_type == "DequantizeLinear":
                weight = producers[weight].input[0]
            out[node.name] = types.get(weight, onnx.TensorProto.FLOAT)
    return out


def test_the_networks_are_int8_and_the_map_arithmetic_stays_float(exported, capsys):
    _, float_path, int8_path = exported
    convs = _weights_of_conv(onnx.load(str(int8_path)))
    networks = {name: t for name, t in convs.items() if name.startswith(QUANTIZED_SCOPES)}
    others = {name: t for name, t in convs.items() if not name.startswith(QUANTIZED_SCOPES)}
    assert networks and set(networks.values()) == {onnx.TensorProto.INT8}
    assert others and set(others.values()) == {onnx.TensorProto.FLOAT}  # smoothing: no 256-level maps
    assert set(_weights_of_conv(onnx.load(str(float_path))).values()) == {onnx.TensorProto.FLOAT}
    assert int8_path.stat().st_size < float_path.stat().st_size
    meta = Inspector(int8_path).metadata  # loads: the integrity hash covers the new threshold
    assert meta["quantize"] == "int8" and meta["threshold"]["quantize"] == "int8"
    assert "quantize" not in Inspector(float_path).metadata
    assert (int8_path.parent / "repo" / "anoddpm" / "1" / "model.onnx").read_bytes() == int8_path.read_bytes()
    capsys.readouterr()
    assert cli(["info", str(int8_path)]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "int8"


def test_the_threshold_is_the_quantile_of_the_int8_graphs_own_good_scores(exported):
    bundle_path, float_path, int8_path = exported
    bundle = load_bundle(bundle_path)
    _, held_back, _ = load_training_data(bundle.cfg, bundle.fingerprint["root"], "synthetic", bundle.cfg.train.seed)
    images = [np.asarray(held_back.arrays[i], np.float32) for i in range(len(held_back))]
    scores, _ = good_scores(int8_path, images)
    int8, flt = Inspector(int8_path), Inspector(float_path)
    quantile = int8.metadata["threshold"]["quantile"]
    assert int8.image_threshold == pytest.approx(float(np.quantile(scores, quantile)), rel=1e-9)
    float_scores, _ = good_scores(float_path, images)
    assert flt.image_threshold == pytest.approx(float(np.quantile(float_scores, quantile)), rel=1e-5)
    assert int8.image_threshold != pytest.approx(flt.image_threshold, rel=1e-6)  # quantisation moved the scores
    assert "good_cache" not in int8.metadata["threshold"]  # the float graph's good scores are not kept
    check = int8.metadata["threshold"]["int8_check"]
    assert check["images"] == 2 * len(images) and 0 <= check["int8_auroc"] <= 1 and 0 <= check["float_auroc"] <= 1


def test_quality_loss_beyond_the_tolerance_writes_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "QUALITY_TOLERANCE", -1.0)  # INT8 would have to beat float by a whole AUROC
    with pytest.raises(ValueError, match=r"--quantize int8: .*synthetic anomalies.*nothing was written"):
        export_onnx(exported[0], tmp_path / "q.onnx", quantize="int8")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_int8_scores_follow_the_float_graph(exported):
    bundle_path, float_path, int8_path = exported
    bundle = load_bundle(bundle_path)
    samples = load_test_set(bundle.cfg, bundle.fingerprint["root"], "synthetic")
    batch = np.stack([s.image for s in samples])
    float_maps, float_scores = Inspector(float_path).run(batch)
    int8_maps, int8_scores = Inspector(int8_path).run(batch)
    assert np.isfinite(int8_scores).all() and len(np.unique(int8_scores)) == len(int8_scores)
    # a 4-step model: 0.84 and 0.79 measured; a broken quantisation (wrong scales or zero points) gives ~0
    assert np.corrcoef(float_scores, int8_scores)[0, 1] > 0.6
    assert np.corrcoef(float_maps.ravel(), int8_maps.ravel())[0, 1] > 0.6


def test_unknown_quantisation_is_refused(exported, tmp_path):
    with pytest.raises(ValueError, match="--quantize 'fp16'"):
        export_onnx(exported[0], tmp_path / "x.onnx", quantize="fp16")
    assert not (tmp_path / "x.onnx").exists()
