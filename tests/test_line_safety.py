"""No wrong OK on the line (issue 30): non-finite pixels, scores and maps never become labels; honest line
records (latency, files still being written, unique map files, strict JSON); training runs (hot-folder faults:
tests/test_hot_folder_safety.py)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anoddpm
from anoddpm.bundle import save_bundle, update_threshold
from anoddpm.cli import main
from anoddpm.config import Config
from anoddpm.data.imageio import load_model_image, pil_image, preprocess, read_image, rescale
from anoddpm.data.listing import list_images
from anoddpm.data.truncation import TruncatedImageError
from anoddpm.model.unet import build_unet
from anoddpm.platform.atomic import append_jsonl
from deploy.export import export_module, onnx_metadata
from deploy.inspect import Recorder, inspect_paths, read_log
from deploy.runtime import Inspector
from deploy.watch import snapshot, watch_folder
from onnx_toy import SIZE, ToyDetector, defect_image, good_image, make_toy_onnx, write_png
from test_evaluate_cli import make_bundle, tiny_config

TILE = 16


def _strict_json(line: str) -> dict:
    """json.loads that refuses NaN / Infinity (what a strict JSON reader does)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def _float_tiff(path: Path, bad: float, where: tuple[int, int] = (3, 4)) -> Path:
    """A 24 x 20 float TIFF (mode F) in [0, 1] with one pixel set to `bad`."""
    arr = np.full((24, 20), 0.4, np.float32)
    arr[where] = bad
    Image.fromarray(arr, mode="F").save(path)
    return path


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiled_cfg(**data: object) -> Config:
    cfg = Config().override("data", image_size=32, channels=1, tile_size=TILE, min_val_images=2, **data)
    cfg = cfg.override("model", preset="tiny").override("diffusion", timesteps=100)
    return cfg.override("detect", depth=40, steps=2, smoothing_sigma=1.0, map_reference="none",
                        scorer="residual").validate()


def _bundle(path: Path, cfg: Config, threshold: dict | None = None) -> Path:
    torch.manual_seed(0)
    return save_bundle(path, cfg=cfg, state_dict=build_unet(cfg).state_dict(), fingerprint={"source": "random"},
                       threshold=threshold)


class _DarkIsNaN(ToyDetector):
    """The toy detector, except that an image darker than 0.5 on average gets a NaN map and score."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, _ = super().forward(images)
        amap = amap + torch.sqrt(images.mean(dim=(1, 2, 3), keepdim=True) - 0.5)  # NaN below 0.5
        return amap, amap.amax(dim=(1, 2, 3))


def _nan_onnx(path: Path) -> Path:
    cfg = Config().override("data", image_size=SIZE, channels=1).override("model", preset="tiny")
    return export_module(_DarkIsNaN(), path, channels=1, image_size=SIZE,
                         metadata=onnx_metadata(cfg, {"image": 0.01, "pixel": None, "method": "quantile"},
                                                {"source": "toy"}))


def _tiled_toy_onnx(path: Path) -> Path:
    cfg = Config().override("data", image_size=SIZE, channels=1, tile_size=SIZE).override("model", preset="tiny")
    return export_module(ToyDetector(), path, channels=1, image_size=SIZE,
                         metadata=onnx_metadata(cfg, {"image": 0.01, "pixel": None, "method": "quantile"},
                                                {"source": "toy"}))


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_onnx(tmp_path_factory.mktemp("toy") / "model.onnx")


# --- non-finite pixels: one reader, the tiled and squashed paths refuse alike -------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels_are_refused_alike_tiled_and_squashed(tmp_path: Path, bad: float) -> None:
    path = _float_tiff(tmp_path / "part.tif", bad)
    for tile_size in (0, TILE):  # squashed, tiled
        with pytest.raises(ValueError, match=r"part\.tif holds 1 pixel value\(s\) that are not finite"):
            load_model_image(path, 1, 32, "resize", tile_size, 1.0)
    with pytest.raises(ValueError, match=r"PIL image \(mode F\)"):
        pil_image(Image.open(path), 1)
    arr = np.full((24, 20, 1), 0.4, np.float32)
    arr[3, 4] = bad
    for prepare in (lambda a: preprocess(a, 32, "resize"), lambda a: rescale(a, 1.0)):
        with pytest.raises(ValueError, match="finite"):
            prepare(arr)
    assert read_image(_float_tiff(tmp_path / "fine.tif", 0.9), 1)[3, 4, 0] == pytest.approx(0.9)


def test_nan_tiff_is_refused_by_the_api_on_a_tiled_bundle_and_onnx(tmp_path: Path) -> None:
    nan_tiff = _float_tiff(tmp_path / "nan.tif", math.nan)
    fine = write_png(tmp_path / "fine.png", good_image())
    bundle = anoddpm.load(_bundle(tmp_path / "model.pt", _tiled_cfg()), device="cpu")
    onnx_model = anoddpm.load(_tiled_toy_onnx(tmp_path / "tiled.onnx"))
    for model in (bundle, onnx_model):
        assert model.backend.tile_size > 0
        with pytest.raises(ValueError, match=r"nan\.tif holds 1 pixel"):
            model.predict([fine, nan_tiff])
        assert math.isfinite(model.predict(fine).pred_score)
    with pytest.raises(ValueError, match=r"nan\.tif holds 1 pixel"):
        Inspector(tmp_path / "tiled.onnx").inspect([nan_tiff])


def test_score_and_inspect_give_nan_pixel_files_an_error_not_a_label(toy: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _float_tiff(inputs / "nan.tif", math.nan)
    _float_tiff(inputs / "inf.tif", math.inf)
    write_png(inputs / "fine.png", good_image())
    model = _bundle(tmp_path / "model.pt", _tiled_cfg())
    assert main(["score", "--model", str(model), "--input", str(inputs), "--out", str(tmp_path / "s")]) == 1
    with (tmp_path / "s" / "scores.csv").open(newline="") as f:
        assert [Path(r["path"]).name for r in csv.DictReader(f)] == ["fine.png"]
    with (tmp_path / "s" / "errors.csv").open(newline="") as f:
        errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(f)}
    assert set(errors) == {"nan.tif", "inf.tif"} and all("not finite" in e for e in errors.values())
    assert main(["inspect", "--model", str(toy), "--input", str(inputs), "--out", str(tmp_path / "i")]) == 1
    lines = [_strict_json(x) for x in (tmp_path / "i" / "inspections.jsonl").read_text().splitlines()]
    assert {Path(r["path"]).name: "error" in r for r in lines} == {"nan.tif": True, "inf.tif": True,
                                                                   "fine.png": False}


# --- non-finite model outputs: an error naming the file, never a label; strict JSON --------------------------------

def test_non_finite_onnx_output_is_an_error_record_and_the_log_is_strict_json(tmp_path: Path) -> None:
    model = _nan_onnx(tmp_path / "nan.onnx")
    inputs = tmp_path / "in"
    write_png(inputs / "dark.png", np.full((48, 40), 0.2, np.float32))
    write_png(inputs / "bright.png", np.full((48, 40), 0.8, np.float32))
    assert main(["inspect", "--model", str(model), "--input", str(inputs), "--out", str(tmp_path / "out")]) == 1
    records = {Path(r["path"]).name: r for r in
               (_strict_json(x) for x in (tmp_path / "out" / "inspections.jsonl").read_text().splitlines())}
    assert "not a finite number" in records["dark.png"]["error"] and "pred_label" not in records["dark.png"]
    assert records["bright.png"]["pred_score"] == pytest.approx(math.sqrt(0.8 - 0.5), abs=0.01)
    inspector = Inspector(model)
    with pytest.raises(ValueError, match=r"dark\.png: the model's output is not a finite number"):
        inspector.inspect([inputs / "bright.png", inputs / "dark.png"])
    with pytest.raises(ValueError, match="image 1 of the input"):
        inspector.inspect([np.full((40, 40), 0.8, np.float32), np.full((40, 40), 0.2, np.float32)])
    with pytest.raises(ValueError, match=r"dark\.png"):
        anoddpm.load(model).predict(inputs / "dark.png")
    assert anoddpm.load(model).predict(inputs / "bright.png").pred_label is True
    with pytest.raises(ValueError, match="JSON compliant"):
        append_jsonl(tmp_path / "x.jsonl", {"pred_score": math.nan})
    assert (tmp_path / "x.jsonl").read_text() == ""


def test_non_finite_torch_output_is_an_error_row_in_score_and_an_error_in_the_api(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from anoddpm.detection.scoring_loop import BatchResult
    from anoddpm.detection.tiling import WholeImages

    real = WholeImages.forward_images

    def first_is_nan(self, images, device):
        result = real(self, images, device)
        result.scores[0] = math.nan
        return BatchResult(result.maps, result.scores, result.reconstructions, result.seconds)

    monkeypatch.setattr(WholeImages, "forward_images", first_is_nan)
    inputs = tmp_path / "in"
    for k in range(3):
        write_png(inputs / f"{k}.png", good_image(k))
    cfg = tiny_config()
    model = make_bundle(tmp_path / "model.pt", tmp_path, "none")
    update_threshold(model, {"image": 0.05, "pixel": None, "method": "quantile", "detect": asdict(cfg.detect)})
    args = ["score", "--model", str(model), "--input", str(inputs), "--out", str(tmp_path / "out"), "--batch-size", "2"]
    assert main(args) == 1
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["1.png"]  # batches [0, 1] and [2]: 0 and 2 came out NaN
    assert all(math.isfinite(float(r["pred_score"])) for r in rows)
    with (tmp_path / "out" / "errors.csv").open(newline="") as f:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(f)) == ["0.png", "2.png"]
    from anoddpm.api import _TorchBackend

    real_run = _TorchBackend.run
    monkeypatch.setattr(_TorchBackend, "run", lambda self, batch: (lambda m, s: (m, s * math.nan))(*real_run(self, batch)))
    with pytest.raises(ValueError, match=r"0\.png: the model's output is not a finite number"):
        anoddpm.load(model, device="cpu").predict(inputs / "0.png")


# --- honest line records --------------------------------------------------------------------------------------------

def test_latency_is_each_images_share_of_its_batch(toy: Path, tmp_path: Path, monkeypatch) -> None:
    real_run = Inspector.run

    def slow_run(self, batch):
        time.sleep(0.4)
        return real_run(self, batch)

    monkeypatch.setattr(Inspector, "run", slow_run)
    paths = [write_png(tmp_path / f"{k}.png", good_image(k)) for k in range(4)]
    recorder = Recorder(Inspector(toy, batch_size=4), tmp_path / "out")
    inspect_paths(recorder, paths)
    records = read_log(recorder.log_path)
    assert [r["batch_size"] for r in records] == [4, 4, 4, 4]
    assert all(100.0 <= r["latency_ms"] < 300.0 for r in records)  # 400 ms / 4, not 400 ms each


def test_truncated_png_and_jpeg_are_still_being_written(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)
    data = _png(arr)
    (tmp_path / "no_iend.png").write_bytes(data[:-12])  # every pixel there, only the end chunk missing
    (tmp_path / "trailing.png").write_bytes(data + b"camera trailer")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    (tmp_path / "no_eoi.jpg").write_bytes(buf.getvalue()[:-2])
    (tmp_path / "whole.jpg").write_bytes(buf.getvalue())
    for name in ("no_iend.png", "no_eoi.jpg"):
        with pytest.raises(TruncatedImageError, match=f"{name} ends before its"):
            read_image(tmp_path / name, 1)
    assert read_image(tmp_path / "trailing.png", 1).shape == (40, 48, 1)
    assert read_image(tmp_path / "whole.jpg", 1).shape == (40, 48, 1)
    (tmp_path / "zeros.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError) as corrupt:
        read_image(tmp_path / "zeros.png", 1)
    assert not isinstance(corrupt.value, TruncatedImageError)  # corrupt, not cut short: logged after the grace


def test_png_without_its_end_chunk_is_inspected_once_when_complete(toy: Path, tmp_path: Path) -> None:
    recorder = Recorder(Inspector(toy), tmp_path / "out")
    data = _png((good_image() * 255).astype(np.uint8))
    part = tmp_path / "part.png"
    part.write_bytes(data[:-12])
    old = time.time() - 10  # older than the unreadable grace: only its missing end keeps it waiting
    os.utime(part, (old, old))
    assert inspect_paths(recorder, [part], [snapshot(part)]) == []
    part.write_bytes(data)
    assert inspect_paths(recorder, [part], [snapshot(part)]) == [snapshot(part)]
    records = read_log(recorder.log_path)
    assert len(records) == 1 and records[0]["pred_label"] is False and "supersedes_error" not in records[0]


def test_save_maps_of_part_png_and_part_jpg_are_two_files(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((good_image() * 255).astype(np.uint8)).save(inputs / "part.png")
    Image.fromarray((defect_image() * 255).astype(np.uint8)).save(inputs / "part.jpg", quality=95)
    model = make_bundle(tmp_path / "model.pt", tmp_path, "none")
    update_threshold(model, {"image": 0.05, "pixel": 0.03, "method": "quantile",
                             "detect": asdict(tiny_config().detect)})
    out = tmp_path / "out"
    assert main(["score", "--model", str(model), "--input", str(inputs), "--out", str(out), "--save-maps",
                 "--save-overlays"]) == 0
    for folder in ("maps", "overlays"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["part.jpg.png", "part.png.png"]
    maps = [np.asarray(Image.open(out / "maps" / n)) for n in ("part.png.png", "part.jpg.png")]
    assert not np.array_equal(maps[0], maps[1])


def test_tile_scale_that_leaves_no_image_is_refused_per_file(tmp_path: Path) -> None:
    path = write_png(tmp_path / "part.png", good_image())
    with pytest.raises(ValueError, match=r"part\.png: a 48x40 image scaled by tile_scale=1e-06 is 0x0 px"):
        load_model_image(path, 1, 32, "resize", TILE, 1e-6)
    assert load_model_image(path, 1, 32, "resize", TILE, 0.5).shape == (1, 24, 20)
    model = _bundle(tmp_path / "model.pt", _tiled_cfg(tile_scale=1e-6))
    assert main(["score", "--model", str(model), "--input", str(path), "--out", str(tmp_path / "out")]) == 1
    with (tmp_path / "out" / "errors.csv").open(newline="") as f:
        assert ["tile_scale" in r["error"] and r["path"] == str(path) for r in csv.DictReader(f)] == [True]


def test_score_fails_when_files_fail_and_scores_a_file_once_however_named(tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    write_png(inputs / "good.png", good_image())
    for k, content in enumerate([b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, _png(
            np.zeros((8, 8), np.uint8))[:-12]]):
        (inputs / f"bad{k}.png").write_bytes(content)
    model = make_bundle(tmp_path / "model.pt", tmp_path, "none")
    assert main(["score", "--model", str(model), "--input", str(inputs), "--out", str(tmp_path / "a")]) == 1
    assert "4 file(s) of this run could not be scored" in capsys.readouterr().err
    good = write_png(tmp_path / "one" / "good.png", good_image())
    four_ways = [good, good, good.parent, good.parent / ".." / "one" / "good.png"]
    assert main(["score", "--model", str(model), "--input", *map(str, four_ways), "--out", str(tmp_path / "b")]) == 0
    with (tmp_path / "b" / "scores.csv").open(newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(good)]
    assert list_images(four_ways) == ([good], [])


def test_inspect_never_takes_its_own_outputs_as_inputs(toy: Path, tmp_path: Path) -> None:
    line = tmp_path / "line"
    write_png(line / "a.png", good_image())
    out = line / "out"
    assert main(["inspect", "--model", str(toy), "--input", str(line), "--out", str(out), "--save-maps"]) == 0
    own = sorted((out / "maps").iterdir())
    assert [p.name for p in own] == ["a.png"]
    # named explicitly (a shell glob such as line/*/*.png), its own map is still not an input
    assert main(["inspect", "--model", str(toy), "--input", *map(str, own), "--out", str(out)]) == 2
    assert len(read_log(out / "inspections.jsonl")) == 1


# --- the hot folder: faults recover or refuse with one line; the log is never replayed ------------------------------

def test_poll_interval_must_be_a_positive_finite_number(toy: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "hot").mkdir()
    for value in ("nan", "inf", "0", "-1", "soon"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "--model", str(toy), "--watch", str(tmp_path / "hot"), "--out", str(tmp_path / "o"),
                  "--poll-interval", value])
        assert exit_info.value.code == 2 and "positive finite number of seconds" in capsys.readouterr().err
    for value in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="poll-interval"):
            watch_folder(tmp_path / "hot", lambda ready: ready, poll_interval=value, stop=threading.Event())


def test_training_log_lines_are_strict_json(tmp_path: Path) -> None:
    from anoddpm.training.run_log import RunLog

    RunLog(tmp_path)({"step": 3, "loss": math.nan, "head_check": {"fused": [math.inf, 0.5]}})
    assert _strict_json((tmp_path / "log.jsonl").read_text()) == {"step": 3, "loss": None,
                                                                  "head_check": {"fused": [None, 0.5]}}
