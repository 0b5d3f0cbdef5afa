"""deploy/runtime.py: the torch-free Inspector on a toy exported model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from anoddpm.data.imageio import load_image
from deploy.runtime import Inspector
from onnx_toy import SIZE, THRESHOLD, defect_image, good_image, make_toy_onnx, write_png

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_onnx(tmp_path_factory.mktemp("toy") / "model.onnx")


def _toy_numpy(img: np.ndarray) -> np.ndarray:
    """The toy graph in numpy: squared residual of a 5x5 box blur without padding."""
    x = img[0].astype(np.float64)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            win = x[max(i - 2, 0):i + 3, max(j - 2, 0):j + 3]
            out[i, j] = (x[i, j] - win.mean()) ** 2
    return out


def test_inspect_files_and_arrays(toy, tmp_path):
    good, bad = write_png(tmp_path / "good.png", good_image()), write_png(tmp_path / "bad.png", defect_image())
    inspector = Inspector(toy, batch_size=2)
    results = inspector.inspect([good, bad, defect_image(1)])
    assert [r["pred_label"] for r in results] == [False, True, True]
    assert results[0]["path"] == str(good) and results[2]["path"] is None
    expected = _toy_numpy(load_image(bad, 1, SIZE, "resize"))
    np.testing.assert_allclose(results[1]["anomaly_map"], expected, atol=1e-6)
    assert results[1]["pred_score"] == pytest.approx(expected.max(), abs=1e-6)
    assert results[1]["anomaly_map"].shape == (SIZE, SIZE)
    np.testing.assert_array_equal(results[1]["pred_mask"], results[1]["anomaly_map"] > THRESHOLD)
    assert 0 < results[1]["pred_mask"].sum() < SIZE * SIZE
    assert results[0]["pred_mask"].sum() == 0


def test_scores_do_not_depend_on_batching(toy):
    images = [good_image(i) if i % 2 else defect_image(i) for i in range(5)]
    one = [r["pred_score"] for r in Inspector(toy, batch_size=1).inspect(images)]
    many = [r["pred_score"] for r in Inspector(toy, batch_size=4).inspect(images)]
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-7)


def test_pixel_threshold_from_metadata(tmp_path):
    path = make_toy_onnx(tmp_path / "m.onnx", {"image": THRESHOLD, "pixel": 0.05})
    inspector = Inspector(path)
    result = inspector.inspect([defect_image()])[0]
    assert inspector.pixel_threshold == 0.05
    np.testing.assert_array_equal(result["pred_mask"], result["anomaly_map"] > 0.05)


def test_wrong_array_shape_is_refused(toy):
    with pytest.raises(ValueError, match="C = 1, 3 or 4"):
        Inspector(toy).inspect([np.zeros((40, 40, 2), np.float32)])


def test_one_bare_path_or_array_is_one_image(toy, tmp_path):
    bad = write_png(tmp_path / "bad.png", defect_image())
    inspector = Inspector(toy)
    by_path, by_str = inspector.inspect(bad), inspector.inspect(str(bad))
    assert len(by_path) == len(by_str) == 1 and by_path[0]["path"] == str(bad) and by_path[0]["pred_label"]
    by_array = inspector.inspect(defect_image())
    assert len(by_array) == 1 and by_array[0]["pred_score"] == pytest.approx(by_path[0]["pred_score"], abs=1e-4)
    rgb = np.repeat(defect_image()[..., None], 3, axis=2)  # converted to grey like an RGB file
    assert inspector.inspect(rgb)[0]["pred_score"] == pytest.approx(by_array[0]["pred_score"], abs=1e-6)


def _with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(key, None) if value is None else props.__setitem__(key, value)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"anoddpm_format_version": None}, "no anoddpm_format_version"),
    ({"anoddpm_format_version": "99"}, "anoddpm_format_version '99'"),
    ({"threshold": "null"}, "no image threshold"),
    ({"preprocessing": None}, "lacks the field 'preprocessing'"),
])
def test_metadata_refusal_names_the_file(toy, tmp_path, changes, message):
    path = _with_metadata(toy, tmp_path / "edited.onnx", **changes)
    with pytest.raises(ValueError, match=message) as err:
        Inspector(path)
    assert str(path) in str(err.value)


def test_truncated_and_missing_files(toy, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(toy.read_bytes()[: toy.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        Inspector(truncated)
    assert str(truncated) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        Inspector(tmp_path / "missing.onnx")


def test_providers(toy):
    assert Inspector(toy).provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert Inspector(toy, providers=["CPUExecutionProvider"]).provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        Inspector(toy, providers=["NoSuchExecutionProvider"])


def test_runtime_never_imports_torch(toy, tmp_path):
    image = write_png(tmp_path / "bad.png", defect_image())
    code = ("import sys; from deploy.runtime import Inspector; "
            f"r = Inspector({str(toy)!r}).inspect([{str(image)!r}])[0]; "
            "assert r['pred_label'], r; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
