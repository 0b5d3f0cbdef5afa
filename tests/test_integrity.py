"""No wrong OK from a model file (issue 30): weights and thresholds that are not finite numbers, calibrations that
belong to other weights or fitted states, stale or unsafe recorded data roots, malformed fields and edited ONNX
metadata are refused with one line naming the file; files written before these checks keep working."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx
import pytest
import torch

from anoddpm.bundle import calibration_fingerprint, load_bundle, save_bundle, update_threshold
from anoddpm.cli import main
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.detection.backbone import weights_file
from anoddpm.detection.calibration import training_root
from deploy.runtime import Inspector
from deploy.export import export_module
from onnx_toy import SIZE, ToyDetector, make_toy_onnx, with_metadata
from test_evaluate_cli import make_bundle, tiny_config

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root with category 'cat', a bundle calibrated with residual+feature_memory: sealed, with a feature
    memory, a nearest_good bank, component scales and a backbone identity)."""
    tmp = tmp_path_factory.mktemp("integrity")
    make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=12, n_test_good=2, n_test_defect=2)
    cfg = tiny_config().override("backbone", image_size=64).override("detect", memory_size=200).validate()
    model = make_bundle(tmp / "model.pt", tmp / "data", "cat", cfg)
    assert main(["calibrate", "--model", str(model), "--scorer", "residual+feature_memory", "--batch-size", "4"]) == 0
    return tmp / "data", model


def _copy(model: Path, tmp_path: Path, name: str = "copy.pt") -> Path:
    return Path(shutil.copy(model, tmp_path / name))


def _rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Edit the bundle's dict and save it again with torch.save: every zip checksum is valid."""
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)
    return path


def _refused(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        load_bundle(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_a_calibrated_bundle_is_sealed_to_what_it_holds(sealed: tuple[Path, Path]) -> None:
    data, model = sealed
    raw = torch.load(model, weights_only=True)
    assert raw["calibration_seal"] == 1 and raw["feature_memory"].shape == (200, 152)
    assert raw["threshold"]["calibration_sha256"] == calibration_fingerprint(raw)
    assert raw["threshold"]["data"] == {"root": str(data.resolve()), "category": "cat", "kind": "mvtec"}
    assert load_bundle(model).calibration_problem is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_threshold_is_refused_and_info_marks_it(sealed: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, value: float) -> None:
    data, model = sealed
    copy = _rewrite(_copy(model, tmp_path), lambda raw: raw["threshold"].update(image=value))
    _refused(copy, rf"threshold\.image={value} is not a finite number.*anoddpm calibrate --model")
    out = tmp_path / "scores"
    assert main(["score", "--model", str(copy), "--input", str(data / "cat" / "test"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a finite number" in err and len(err.strip().splitlines()) == 1
    assert not (out / "scores.csv").exists()
    assert main(["info", str(copy)]) == 0  # shown, marked invalid, with a warning; strict JSON (no bare NaN)
    captured = capsys.readouterr()
    described = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"bare {c} in info's JSON"))
    assert described["threshold"] is None and "is not a finite number" in described["calibration_problem"]
    assert "is not a finite number" in captured.err
    assert main(["calibrate", "--model", str(copy)]) == 0  # calibrate replaces it
    assert load_bundle(copy).threshold["image"] == pytest.approx(load_bundle(model).threshold["image"], rel=1e-6)


def test_a_non_finite_threshold_is_never_written(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = sealed
    copy = _copy(model, tmp_path)
    before = copy.read_bytes()
    with pytest.raises(ValueError, match=r"calibration was not written: its threshold\.image=nan"):
        update_threshold(copy, {**load_bundle(copy).threshold, "image": float("nan")})
    assert copy.read_bytes() == before


@pytest.mark.parametrize("case", ["all nan", "one inf", "int64"])
def test_weights_that_are_not_finite_floats_are_refused_and_not_exported(
        sealed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    _, model = sealed

    def change(raw: dict[str, Any]) -> None:
        weights = raw["state_dict"]
        if case == "all nan":
            for name in weights:
                weights[name] = torch.full_like(weights[name], float("nan"))
        elif case == "one inf":
            name = next(iter(weights))
            weights[name] = weights[name].clone()
            weights[name].view(-1)[0] = float("inf")
        else:
            name = next(k for k, v in weights.items() if v.abs().max() < 1)  # truncated to zeros
            weights[name] = weights[name].to(torch.int64)

    copy = _rewrite(_copy(model, tmp_path), change)
    _refused(copy, "stored as torch.int64, not floating point" if case == "int64" else "holds NaN or infinite values")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--model", str(copy), "--out", str(onnx_path)]) == 2
    assert "state_dict weight" in capsys.readouterr().err and not onnx_path.exists()


def test_a_threshold_copied_from_another_bundle_is_refused_until_recalibrated(
        sealed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, model = sealed
    other = make_bundle(tmp_path / "other.pt", data, "cat")  # other weights, residual only
    raw = torch.load(other, weights_only=True)
    raw["state_dict"] = {k: v + 0.01 for k, v in raw["state_dict"].items()}
    torch.save(raw, other)
    assert main(["calibrate", "--model", str(other)]) == 0
    foreign = torch.load(other, weights_only=True)["threshold"]
    copy = _rewrite(_copy(model, tmp_path), lambda raw: raw.update(threshold=foreign))
    _refused(copy, "its calibration does not belong to its weights and fitted states.*anoddpm calibrate --model")
    out = tmp_path / "scores"
    assert main(["score", "--model", str(copy), "--input", str(data / "cat" / "test"), "--out", str(out)]) == 2
    assert "recalibrate: anoddpm calibrate --model" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(copy), "--scorer", "residual"]) == 0
    assert load_bundle(copy).threshold["calibration_sha256"] == calibration_fingerprint(
        torch.load(copy, weights_only=True))


def test_an_old_unsealed_threshold_copied_into_a_sealed_bundle_is_refused(sealed: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    _, model = sealed
    old = torch.load(LEGACY / "model.pt", weights_only=True)["threshold"]
    copy = _rewrite(_copy(model, tmp_path), lambda raw: raw.update(threshold=old))
    _refused(copy, "threshold carries no calibration fingerprint although this file's calibrations are sealed")


@pytest.mark.parametrize("case", ["whole calibration onto other weights", "feature memory rows cut",
                                  "component scale edited", "detect settings edited", "backbone identity removed"])
def test_a_calibration_that_belongs_to_something_else_is_refused(sealed: tuple[Path, Path], tmp_path: Path,
                                                                 case: str) -> None:
    _, model = sealed

    def change(raw: dict[str, Any]) -> None:
        if case == "whole calibration onto other weights":  # threshold, banks, scales of `model`, weights of another
            raw["state_dict"] = {k: v * 1.01 for k, v in raw["state_dict"].items()}
        elif case == "feature memory rows cut":
            raw["feature_memory"] = raw["feature_memory"][:5].clone()
        elif case == "component scale edited":
            raw["component_scale"] = raw["component_scale"] * 2
        elif case == "detect settings edited":
            raw["threshold"]["detect"]["smoothing_sigma"] = 2.0
            raw["config"]["detect"]["smoothing_sigma"] = 2.0
        else:
            del raw["backbone"]

    copy = _rewrite(_copy(model, tmp_path), change)
    expected = ("backbone identity is missing" if case == "backbone identity removed"
                else "its calibration does not belong to its weights and fitted states")
    _refused(copy, expected)


def test_other_backbone_weights_without_the_identity_are_refused(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    """The identity removed and other weights of the same architecture supplied (backbone.weights)."""
    _, model = sealed
    state = torch.load(weights_file(load_bundle(model).cfg.backbone), weights_only=True)
    other = tmp_path / "other_lite0.pth"
    torch.save({k: v * 1.1 if v.is_floating_point() else v for k, v in state.items()}, other)

    def change(raw: dict[str, Any]) -> None:
        raw.pop("backbone")
        raw.pop("feature_memory")  # a bank without an identity is refused by its shape check: here only the seal is left
        raw["config"]["backbone"]["weights"] = str(other)

    copy = _rewrite(_copy(model, tmp_path), change)
    _refused(copy, "its calibration does not belong to its weights")


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.update(config=[["data", {}]]), r"invalid config: it must be a mapping of sections, got list"),
    (lambda raw: raw.update(threshold="0.5"), r"its threshold must be a mapping of calibration fields, got str"),
    (lambda raw: raw["threshold"].update(detect="depth=40"), r"its threshold\.detect must be a mapping, got str"),
    (lambda raw: raw["threshold"].update(image="0.5"), r"its threshold\.image='0\.5' is not a finite number"),
    (lambda raw: raw.update(reference_bank=torch.ones(3, 4)), r"its reference_bank must be a mapping of features"),
    (lambda raw: raw.update(feature_memory=torch.ones(10, 40)),
     r"its feature_memory has rows of width 40, not the 152 of backbone\.layers \[3, 5\]"),
    (lambda raw: raw.update(map_reference=torch.full((1, 2, 32, 32), float("nan"))),
     r"its map_reference holds NaN or infinite values"),
    (lambda raw: raw.update(fingerprint="root=/"), r"its data fingerprint must be a mapping, got str"),
])
def test_malformed_fields_are_one_line_naming_file_and_field(sealed: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture, change, message) -> None:
    _, model = sealed
    copy = _rewrite(_copy(model, tmp_path), change)
    _refused(copy, message)
    assert main(["export", "--model", str(copy), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibrating_on_a_new_product_records_its_root_for_later_recalibration(
        sealed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, model = sealed
    new = tmp_path / "new"
    make_synthetic_dataset(new, category="part", size=32, n_train=10, n_test_good=2, n_test_defect=2, seed=3)
    copy = _copy(model, tmp_path)
    assert main(["calibrate", "--model", str(copy), "--data", str(new), "--category", "part"]) == 0
    bundle = load_bundle(copy)
    assert bundle.threshold["data"] == {"root": str(new.resolve()), "category": "part", "kind": "mvtec"}
    assert bundle.fingerprint["root"] == str(data.resolve())  # the training data is still what it was
    assert training_root(bundle, None, None) == (new.resolve(), "part")
    capsys.readouterr()
    out = tmp_path / "scores"
    assert main(["score", "--model", str(copy), "--input", str(new / "part" / "test"), "--out", str(out),
                 "--depth", "20"]) == 0
    err = capsys.readouterr().err
    assert f"under {new.resolve()}" in err and str(data.resolve()) not in err  # recalibrated on the new product
    settings = json.loads((out / "settings.json").read_text())
    assert settings["detect"]["depth"] == 20


@pytest.mark.parametrize("where", ["calibration", "training"])
def test_a_recorded_filesystem_root_or_lost_layout_is_refused_not_searched(
        sealed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    data, model = sealed
    copy = _copy(model, tmp_path)
    if where == "calibration":  # written by calibrate itself, so the seal holds
        threshold = load_bundle(copy).threshold
        update_threshold(copy, {**threshold, "data": {"root": "/", "category": None, "kind": "folder"}},
                         **{k: getattr(load_bundle(copy), k) for k in ("reference_bank", "feature_memory",
                                                                        "component_scale", "backbone")})
    else:
        bundle = load_bundle(copy)
        save_bundle(copy, cfg=bundle.cfg, state_dict=bundle.state_dict, fingerprint={**bundle.fingerprint, "root": "/"})
    with pytest.raises(ValueError, match=r"records the data root / \(its (latest calibration|training data)\), which "
                                         r"is a filesystem root \(never searched for images\); pass --data ROOT"):
        training_root(load_bundle(copy), None, None)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "is a filesystem root" in err and len(err.strip().splitlines()) == 1
    moved = tmp_path / "moved"  # a recorded mvtec root whose category folder lost its train/ folder
    shutil.copytree(data, moved)
    shutil.rmtree(moved / "cat" / "train")
    bundle = load_bundle(model)
    bundle.threshold = {**bundle.threshold, "data": {"root": str(moved), "category": "cat", "kind": "mvtec"}}
    with pytest.raises(ValueError, match="no longer holds the mvtec layout it was recorded with"):
        training_root(bundle, None, None)


def test_files_written_before_the_checks_load_and_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = torch.load(LEGACY / "model.pt", weights_only=True)
    assert "calibration_seal" not in raw and "calibration_sha256" not in raw["threshold"]
    bundle = load_bundle(LEGACY / "model.pt")
    assert bundle.calibration_problem is None and bundle.threshold["image"] == raw["threshold"]["image"]
    old_onnx = Path(shutil.copy(LEGACY / "model.onnx", tmp_path / "old.onnx"))
    with caplog.at_level(logging.WARNING):
        Inspector(old_onnx)
        Inspector(old_onnx)
    warned = [r for r in caplog.records if "carries no integrity hash" in r.getMessage()]
    assert len(warned) == 1


def test_onnx_metadata_is_bound_to_its_graph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = make_toy_onnx(tmp_path / "m.onnx")
    other = make_toy_onnx(tmp_path / "other.onnx", {"image": 5.0, "pixel": None, "method": "quantile"})
    meta = {p.key: p.value for p in onnx.load(str(good)).metadata_props}
    assert len(meta["integrity_sha256"]) == 64
    Inspector(good)
    threshold = json.loads(meta["threshold"])
    edits = {"threshold.detect": {"threshold": json.dumps({**threshold, "detect": {"depth": 10}})},
             "threshold": {"threshold": json.dumps({**threshold, "image": 0.5})},
             "config": {"config": meta["config"].replace('"smoothing_sigma": 4.0', '"smoothing_sigma": 1.0')},
             "steps": {"steps": "3"},
             "another model's metadata": {q.key: q.value for q in onnx.load(str(other)).metadata_props
                                          if q.key != "integrity_sha256"}}
    for name, values in edits.items():
        edited = with_metadata(good, tmp_path / "edited.onnx", **values)
        assert {p.key: p.value for p in onnx.load(str(edited)).metadata_props} != meta, name
        with pytest.raises(ValueError, match="does not belong to its graph") as err:
            Inspector(edited)
        assert str(edited) in str(err.value), name
        assert main(["info", str(edited)]) == 2, name
        assert "does not belong to its graph" in capsys.readouterr().err
    doubled = export_module(_Doubled(), tmp_path / "doubled.onnx", channels=1, image_size=SIZE,
                            metadata={k: v for k, v in meta.items() if k != "integrity_sha256"})
    Inspector(doubled)
    graft = with_metadata(doubled, tmp_path / "graft.onnx", integrity_sha256=meta["integrity_sha256"])
    with pytest.raises(ValueError, match="does not belong to its graph"):
        Inspector(graft)  # the whole metadata of one model (its hash too) on the graph of another


class _Doubled(ToyDetector):
    """The toy graph with its map doubled: another graph under the same metadata."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score = super().forward(images)
        return 2 * amap, 2 * score


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_onnx_with_a_non_finite_threshold_is_refused_at_load(tmp_path: Path, value: str) -> None:
    good = make_toy_onnx(tmp_path / "m.onnx")
    for field in ("image", "pixel"):
        threshold = {"image": 0.01, "pixel": None, "method": "quantile"}
        text = json.dumps(threshold).replace(f'"{field}": {"0.01" if field == "image" else "null"}',
                                             f'"{field}": {value}')
        edited = with_metadata(good, tmp_path / "nan.onnx", threshold=text)
        with pytest.raises(ValueError, match=rf"threshold\.{field}=.* is not a finite number"):
            Inspector(edited)
