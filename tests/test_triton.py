"""deploy/triton.py: `anoddpm export --triton DIR` writes a Triton repository whose model runs in onnxruntime."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from anoddpm.cli import main as cli
from deploy.runtime import INPUT_NAME, OUTPUT_NAMES
from deploy.triton import write_triton_repo
from test_export import SIZE, STEPS, _bundle


def _parse(text: str) -> dict:
    """Minimal pbtxt reading: top-level scalars, tensor names/dims per block, dynamic_batching presence."""
    return {"name": re.search(r'^name: "(\w+)"', text, re.M).group(1),
            "backend": re.search(r'^backend: "(\w+)"', text, re.M).group(1),
            "max_batch_size": int(re.search(r"^max_batch_size: (\d+)", text, re.M).group(1)),
            "input": re.findall(r'name: "(\w+)"', text.split("output [")[0].split("input [")[1]),
            "output": re.findall(r'name: "(\w+)"', text.split("output [")[1].split("dynamic_batching")[0]),
            "dims": [[int(x) for x in d.split(",")] for d in re.findall(r"dims: \[([-\d, ]+)\]", text)],
            "dynamic_batching": "dynamic_batching {" in text}


def test_export_triton_repo_parses_and_runs(tmp_path):
    threshold = {"image": 0.5, "pixel": None, "method": "quantile",
                 "detect": {"steps": STEPS, "scorer": "residual", "fusion": "max"}}
    bundle = _bundle(tmp_path / "model.pt", threshold)
    code = cli(["export", "--model", str(bundle), "--out", str(tmp_path / "model.onnx"), "--steps", str(STEPS),
                "--triton", str(tmp_path / "repo")])
    assert code == 0
    folder = tmp_path / "repo" / "anoddpm"
    cfg = _parse((folder / "config.pbtxt").read_text())
    assert cfg["name"] == "anoddpm" and cfg["backend"] == "onnxruntime" and cfg["max_batch_size"] == 8
    assert cfg["input"] == [INPUT_NAME] and cfg["output"] == list(OUTPUT_NAMES) and cfg["dynamic_batching"]
    assert cfg["dims"][0] == [1, SIZE, SIZE] and cfg["dims"][1] == [-1, -1, -1] and cfg["dims"][2] == [1]
    assert "reshape: { shape: [ ] }" in (folder / "config.pbtxt").read_text()  # pred_score is one number per image
    model_path = folder / "1" / "model.onnx"
    assert model_path.read_bytes() == (tmp_path / "model.onnx").read_bytes()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).random((3, 1, SIZE, SIZE), dtype=np.float32)
    amap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    assert amap.shape == (3, 1, SIZE, SIZE) and score.shape == (3,) and np.isfinite(score).all()


def test_non_anoddpm_graph_is_refused(tmp_path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="anoddpm export"):
        write_triton_repo(tmp_path / "other.onnx", tmp_path / "repo")
