"""The one rule (anoddpm.detection.settings): scores meet only a threshold calibrated for their detection settings."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.cli import main
from anoddpm.detection.settings import describe_differences, detect_differences
from anoddpm.data.synth import make_synthetic_dataset
from test_evaluate_cli import make_bundle


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset category folder, bundle calibrated with the tiny config's depth 40, steps 2)."""
    tmp = tmp_path_factory.mktemp("guard")
    cat = make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=12, n_test_good=2, n_test_defect=2)
    model = make_bundle(tmp / "model.pt", tmp / "data", "cat")
    bundle = load_bundle(model)  # every weight perturbed, so K and depth change the reconstruction
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in bundle.state_dict.items()}
    save_bundle(model, cfg=bundle.cfg, state_dict=state, fingerprint=bundle.fingerprint)
    assert main(["calibrate", "--model", str(model)]) == 0
    return cat, model


def _copy(model: Path, tmp_path: Path, name: str = "copy.pt") -> Path:
    shutil.copy(model, tmp_path / name)
    return tmp_path / name


def _calibrated_threshold(model: Path, tmp_path: Path, *flags: str) -> float:
    """The image threshold `anoddpm calibrate` stores with these detection flags (on a copy)."""
    copy = _copy(model, tmp_path, "recalibrated.pt")
    assert main(["calibrate", "--model", str(copy), *flags]) == 0
    return float(load_bundle(copy).threshold["image"])


def test_differences_name_the_flags() -> None:
    stored = {"depth": 40, "steps": 2, "noise": "gaussian"}
    current = {"depth": 40, "steps": 5, "noise": "simplex", "threshold_quantile": 0.5}
    assert detect_differences(stored, current) == ["steps", "noise"]
    assert describe_differences(stored, current) == "--steps 2 -> 5, --detect-noise gaussian -> simplex"


def test_export_with_other_steps_embeds_a_threshold_calibrated_for_them(
        calibrated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, model = calibrated
    own = load_bundle(model).threshold
    assert own["detect"]["steps"] == 2
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "k5.onnx"), "--steps", "5"]) == 0
    assert "calibrating on its held-back good images" in capsys.readouterr().err
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "k5.onnx")).metadata_props}
    embedded = json.loads(meta["threshold"])
    assert embedded["detect"]["steps"] == 5 and meta["steps"] == "5"
    assert embedded["image"] == pytest.approx(_calibrated_threshold(model, tmp_path, "--steps", "5"), rel=1e-6)
    assert embedded["image"] != pytest.approx(own["image"], rel=1e-5)  # not the K = 2 threshold


def test_export_refuses_other_steps_without_the_training_images(calibrated: tuple[Path, Path],
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cat, model = calibrated
    moved = tmp_path / "moved"
    shutil.copytree(cat.parent, moved)
    copy = _copy(model, tmp_path)
    shutil.rmtree(cat.parent)  # the bundle's recorded training root is gone
    try:
        assert main(["export", "--model", str(copy), "--out", str(tmp_path / "k5.onnx"), "--steps", "5"]) == 2
        err = capsys.readouterr().err
        assert "--steps 2 -> 5" in err and "drop --steps" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "k5.onnx").exists()
        assert main(["export", "--model", str(copy), "--out", str(tmp_path / "own.onnx")]) == 0  # own settings
    finally:
        shutil.copytree(moved, cat.parent)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_score_with_other_depth_recalibrates_and_records_its_settings(
        calibrated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cat, model = calibrated
    out = tmp_path / "out"
    inputs = [str(cat / "train" / "good")]
    assert main(["score", "--model", str(model), "--input", *inputs, "--out", str(out), "--depth", "20"]) == 0
    assert "--depth 40 -> 20" in capsys.readouterr().err
    expected = _calibrated_threshold(model, tmp_path, "--depth", "20")
    rows = _rows(out)
    assert len(rows) == 12 and all(float(r["threshold"]) == pytest.approx(expected, rel=1e-6) for r in rows)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["detect"]["depth"] == 20 and settings["threshold"] == pytest.approx(expected, rel=1e-6)
    assert float(load_bundle(model).threshold["detect"]["depth"]) == 40  # the bundle is not changed


def test_score_rerun_with_other_settings_is_refused(calibrated: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    cat, model = calibrated
    out = tmp_path / "out"
    args = ["score", "--model", str(model), "--input", str(cat / "train" / "good"), "--out", str(out)]
    assert main(args) == 0
    before = (out / "scores.csv").read_text()
    capsys.readouterr()
    assert main([*args, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--steps 2 -> 1" in err and "choose another --out" in err
    assert (out / "scores.csv").read_text() == before
    assert main(args) == 0 and (out / "scores.csv").read_text() == before  # same settings: resumed


def test_evaluate_with_other_settings_names_them(calibrated: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    cat, model = calibrated
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(cat.parent), "--category", "cat",
                 "--out", str(out), "--residual", "l1"]) == 0
    assert "--residual l2 -> l1" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"].startswith("validation") and metrics["calibration"]["detect"]["residual"] == "l1"
