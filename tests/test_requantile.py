"""Recalibration without refitting: a new --quantile alone rescores the cached good scores; detection flags on
score/evaluate refuse before any state is fitted when the training data is not at hand."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import anoddpm.cli.calibrate as calibrate_cli
import anoddpm.detection.calibration as calibration
from anoddpm.bundle import load_bundle, update_threshold
from anoddpm.cli import main
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.detection.requantile import CACHE_POINTS, cache_problem, data_signature, good_cache, requantile
from test_evaluate_cli import make_bundle, tiny_config


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle calibrated with a good_mean map reference (a fitted state) on 20 held-back good images."""
    tmp = tmp_path_factory.mktemp("requantile")
    make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=200, n_test_good=1, n_test_defect=1)
    model = make_bundle(tmp / "model.pt", tmp / "data", "cat")
    assert main(["calibrate", "--model", str(model), "--map-reference", "good_mean"]) == 0
    return tmp / "data", model


def _copy(model: Path, folder: Path, name: str = "model.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, folder / name)
    return folder / name


def test_a_new_quantile_alone_rescores_the_cached_good_scores_without_a_model_run(
        calibrated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    data, model = calibrated
    before = load_bundle(model)
    cache = before.threshold["good_cache"]
    assert cache["n"] == before.threshold["n_good"] == 20 and len(cache["scores"]) == 20
    assert cache["scores"] == sorted(cache["scores"]) and set(cache["pixel_quantiles"]) == {"0.9", "0.99", "0.999"}
    assert cache["data"]["folder"] == str((data / "cat").resolve())
    cached = _copy(model, tmp_path / "cached")
    with monkeypatch.context() as patch:
        patch.setattr(calibrate_cli, "calibrate_threshold", lambda *a, **k: pytest.fail("refitted"))
        patch.setattr(calibration, "fit_and_score_good", lambda *a, **k: pytest.fail("refitted"))
        assert main(["calibrate", "--model", str(cached), "--quantile", "0.5"]) == 0
        assert main(["calibrate", "--model", str(cached), "--quantile", "0.75", "--data", str(data),
                     "--category", "cat"]) == 0  # the same data, named
    after = load_bundle(cached)
    assert after.threshold["quantile"] == 0.75 and after.threshold["method"] == "quantile"
    assert after.threshold["image"] == pytest.approx(np.quantile(cache["scores"], 0.75), rel=1e-12)
    assert after.threshold["pixel"] == before.threshold["pixel"]
    assert torch.equal(after.map_reference, before.map_reference)  # every fitted state kept
    assert "calibrated" in capsys.readouterr().out
    # what a full refit at the same quantile gives (a detection flag, here the bundle's own value, forces one)
    refit = _copy(model, tmp_path / "refit")
    assert main(["calibrate", "--model", str(refit), "--quantile", "0.75", "--map-reference", "good_mean"]) == 0
    full = load_bundle(refit).threshold
    assert full["image"] == pytest.approx(after.threshold["image"], rel=1e-6)
    assert full["pixel"] == pytest.approx(after.threshold["pixel"], rel=1e-6)
    assert full["image"] != pytest.approx(before.threshold["image"], rel=1e-3)  # the quantile did matter


@pytest.mark.parametrize("case", ["flag", "f1", "no quantile", "other data", "changed data"])
def test_anything_but_a_new_quantile_on_the_same_data_refits(calibrated: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    data, model = calibrated
    copy = _copy(model, tmp_path / "m")
    flags = {"flag": ["--quantile", "0.5", "--depth", "40"],  # a detection flag, even the bundle's own value
             "f1": ["--quantile", "0.5", "--method", "f1"], "no quantile": [],
             "other data": ["--quantile", "0.5", "--data", str(tmp_path / "data"), "--category", "cat"],
             "changed data": ["--quantile", "0.5", "--data", str(tmp_path / "data"), "--category", "cat"]}[case]
    if case in ("other data", "changed data"):
        shutil.copytree(data, tmp_path / "data")
    if case == "changed data":  # calibrated on the copy, then one more good image arrives
        update_threshold(copy, {**load_bundle(copy).threshold,
                                "good_cache": good_cache(np.arange(20.0), None, tmp_path / "data", "cat")})
        assert cache_problem(load_bundle(copy).threshold, tmp_path / "data", "cat") is None
        shutil.copy(next((tmp_path / "data/cat/train/good").iterdir()), tmp_path / "data/cat/train/good/new.png")
    calls = []
    stored = load_bundle(copy).threshold

    def fake(*args, **kwargs):
        calls.append(args)
        return {**stored, "image": 123.0}

    monkeypatch.setattr(calibrate_cli, "calibrate_threshold", fake)
    assert main(["calibrate", "--model", str(copy), *flags]) == 0
    assert len(calls) == 1 and load_bundle(copy).threshold["image"] == 123.0


def test_cache_problems_name_why_and_a_bad_quantile_fails_before_any_work(
        calibrated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, model = calibrated
    threshold = load_bundle(model).threshold
    assert cache_problem(threshold, data, "cat") is None
    assert "older anoddpm" in cache_problem({k: v for k, v in threshold.items() if k != "good_cache"}, data, "cat")
    assert "f1" in cache_problem({**threshold, "method": "f1"}, data, "cat")
    assert "not those" in cache_problem(threshold, tmp_path, None)
    with pytest.raises(ValueError, match="q must be"):
        requantile(threshold, 0.0)
    assert main(["calibrate", "--model", str(tmp_path / "missing.pt"), "--quantile", "1.5"]) == 2
    assert "--quantile must be in (0, 1]" in capsys.readouterr().err


def test_the_cache_is_exact_up_to_its_size_and_a_summary_above(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).gamma(2.0, size=5000)
    small = good_cache(scores[:CACHE_POINTS], None, None, None)
    assert small["scores"] == sorted(scores[:CACHE_POINTS].tolist()) and small["data"] is None
    large = good_cache(scores, np.ones((2, 4, 4)), None, None)
    assert len(large["scores"]) == CACHE_POINTS and large["n"] == 5000 and large["pixel_quantiles"]["0.99"] == 1.0
    for q in (0.5, 0.9, 0.99, 0.999):
        assert np.quantile(large["scores"], q) == pytest.approx(np.quantile(scores, q), rel=2e-3)
    (tmp_path / "a.png").write_bytes(b"x")
    first = data_signature(tmp_path, None)
    assert first == data_signature(tmp_path, None) and first["files"] == 1
    (tmp_path / "a.png").write_bytes(b"xy")
    assert data_signature(tmp_path, None) != first


def test_detection_flags_refuse_before_fitting_anything_without_training_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cat = make_synthetic_dataset(tmp_path / "data", category="cat", size=32, n_train=3, n_test_good=1,
                                 n_test_defect=2)
    model = make_bundle(tmp_path / "model.pt", tmp_path / "gone", "cat")  # its training data is not here
    update_threshold(model, {"image": 0.05, "pixel": 0.02, "method": "quantile", "quantile": 0.99, "n_good": 2,
                             "detect": tiny_config().to_dict()["detect"]})
    monkeypatch.setattr(calibration, "fit_and_score_good", lambda *a, **k: pytest.fail("fitted before refusing"))
    args = ["score", "--model", str(model), "--input", str(cat / "test"), "--out", str(tmp_path / "s"),
            "--depth", "30"]
    assert main(args) == 2
    assert "cannot be recalibrated" in capsys.readouterr().err
    for image in (cat / "train" / "good").iterdir():  # evaluate recalibrates on --data: it holds no training image
        image.unlink()
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path / "data"), "--category", "cat",
                 "--out", str(tmp_path / "r"), "--depth", "30"]) == 2
    assert "train/good is missing or holds no images" in capsys.readouterr().err
