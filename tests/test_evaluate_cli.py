"""`anoddpm calibrate` and `anoddpm evaluate` end to end on a generated 32 px dataset."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.cli import main
from anoddpm.config import Config
from anoddpm.detection.settings import same_detect_settings
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.model.unet import build_unet
from eval.metrics import METRIC_KEYS


def tiny_config() -> Config:
    """32 px grey, tiny UNet, 2 fast-path steps from depth 40, the residual map alone (no backbone to run):
    a forward pass takes milliseconds."""
    cfg = Config().override("data", image_size=32, channels=1, min_val_images=2)
    cfg = cfg.override("model", preset="tiny").override("diffusion", timesteps=100)
    return cfg.override("detect", depth=40, steps=2, smoothing_sigma=1.0, scorer="residual").validate()


def make_bundle(path: Path, data_root: Path, category: str, cfg: Config | None = None) -> Path:
    """A random-weight bundle whose fingerprint points at data_root/category (no threshold)."""
    cfg = cfg or tiny_config()
    torch.manual_seed(0)
    fingerprint = {"root": str(data_root.resolve()), "category": category}
    return save_bundle(path, cfg=cfg, state_dict=build_unet(cfg).state_dict(), fingerprint=fingerprint)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=12, n_test_good=4, n_test_defect=6)
    return tmp / "data", make_bundle(tmp / "run" / "model.pt", tmp / "data", "cat")


def test_evaluate_writes_report_with_all_keys(setup: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    data, model = setup
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--category", "cat",
                 "--out", str(out), "--batch-size", "4"]) == 0
    for name in ("metrics.json", "per_image.csv", "roc.png", "pr.png", "histogram.png", "grid.png", "index.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (*METRIC_KEYS, "threshold", "seconds_per_image", "n_images", "per_type_image_auroc",
                "per_type_pixel_auroc", "defect_pixel_share", "detect"):
        assert key in metrics, key
    assert metrics["n_images"] == 10 and metrics["n_defect"] == 6
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["seconds_per_image"] > 0
    assert metrics["detect"]["depth"] == 40 and metrics["detect"]["steps"] == 2
    assert metrics["threshold_source"].startswith("validation")  # the bundle has no threshold
    assert metrics["calibration"]["n_good"] == 2  # 12 train images, 10 % held back, at least 2
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 10 and {r["label"] for r in rows} == {"0", "1"}
    printed = capsys.readouterr().out
    assert str((out / "index.html").resolve()) in printed
    assert metrics["defect_pixel_share"]
    for name, share in metrics["defect_pixel_share"].items():  # one line per defect type
        assert f"{name}: image AUROC" in printed and f"({100 * share:.0f} % of defect pixels)" in printed


def test_evaluate_prints_false_rejects_and_escapes_on_stdout_even_with_q(setup: tuple[Path, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    data, model = setup
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--category", "cat", "--out", str(out),
                 "-q"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    flagged = [int(r["pred_label"]) for r in rows]
    labels = [int(r["label"]) for r in rows]
    rejects = sum(f and not y for f, y in zip(flagged, labels))
    escapes = sum(y and not f for f, y in zip(flagged, labels))
    assert (metrics["false_rejects"], metrics["escapes"]) == (rejects, escapes)
    assert metrics["false_reject_rate"] == pytest.approx(rejects / 4) and metrics["escape_rate"] == pytest.approx(
        escapes / 6)
    assert set(metrics["per_type_escape_rate"]) == set(metrics["per_type_image_auroc"])
    assert "scores" not in metrics["calibration"]["good_cache"]  # the cached good scores stay in the bundle
    assert metrics["overlay_clear"] == metrics["calibration"]["good_cache"]["pixel_quantiles"]["0.99"]
    assert f"{rejects} of 4 good parts rejected" in captured.out and f"{escapes} of 6 defects passed" in captured.out
    assert "image AUROC" in captured.out and "report:" in captured.out.splitlines()[-1]
    for name in ("pixel_roc.png", "pro.png"):
        assert (out / name).stat().st_size > 1000


def test_calibrate_stores_threshold_that_evaluate_uses(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup
    copy = tmp_path / "model.pt"
    copy.write_bytes(model.read_bytes())
    assert main(["calibrate", "--model", str(copy), "--quantile", "0.5"]) == 0  # data root from the fingerprint
    stored = load_bundle(copy).threshold
    assert stored["method"] == "quantile" and stored["quantile"] == 0.5 and stored["n_good"] == 2
    assert stored["pixel"] is not None and stored["detect"]["depth"] == 40
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(copy), "--data", str(data), "--category", "cat", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"] == "bundle"
    assert metrics["threshold"] == pytest.approx(stored["image"], rel=0, abs=0)


def test_calibrated_detection_settings_become_the_bundles_and_export_follows_them(
        setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`calibrate --scorer residual --depth 30` on a bundle with a head: score/evaluate/export then use the
    residual at depth 30 with that threshold, without flags and without recalibrating."""
    from anoddpm.detection.detector import Detector
    from anoddpm.model.head import build_head
    from deploy.export import export_onnx
    from deploy.runtime import Inspector

    data, _ = setup
    cfg = tiny_config().override("detect", scorer="auto")
    torch.manual_seed(0)
    model = save_bundle(tmp_path / "model.pt", cfg=cfg, state_dict=build_unet(cfg).state_dict(),
                        fingerprint={"root": str(data.resolve()), "category": "cat"},
                        head_state_dict=build_head(cfg).state_dict())
    assert Detector.from_bundle(load_bundle(model)).components == ("residual", "head", "feature_memory")
    assert main(["calibrate", "--model", str(model), "--scorer", "residual", "--depth", "30"]) == 0
    bundle = load_bundle(model)
    assert bundle.cfg.detect.scorer == "residual" and bundle.cfg.detect.depth == 30
    assert bundle.threshold["detect"] == asdict(bundle.cfg.detect)
    assert bundle.head_state_dict is not None  # `--scorer fused` still works (calibrating on the fly)
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--category", "cat", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold_source"] == "bundle" and metrics["detect"]["scorer"] == "residual"
    capsys.readouterr()
    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    assert "warning" not in capsys.readouterr().err
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    detector = Detector.from_bundle(bundle)
    assert detector.components == ("residual",)
    with torch.inference_mode():
        amap, score, _ = detector(images)
    inspector = Inspector(onnx_path)
    o_map, o_score = inspector.run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4
    assert inspector.image_threshold == pytest.approx(bundle.threshold["image"])


def test_few_held_back_images_fit_no_map_reference(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup  # 2 held-back good images
    copy = tmp_path / "model.pt"
    copy.write_bytes(model.read_bytes())
    assert main(["calibrate", "--model", str(copy)]) == 0
    assert load_bundle(copy).map_reference is None


def test_calibrate_fits_a_map_reference_that_every_later_map_is_divided_by(tmp_path: Path) -> None:
    from anoddpm.data.datasets import load_training_data
    from anoddpm.detection.detector import Detector
    from eval.threshold import MIN_REFERENCE_IMAGES, reference_map

    data = tmp_path / "data"
    make_synthetic_dataset(data, category="cat", size=32, n_train=10 * MIN_REFERENCE_IMAGES, n_test_good=1,
                           n_test_defect=1)
    copy = make_bundle(tmp_path / "model.pt", data, "cat")
    assert main(["calibrate", "--model", str(copy), "--quantile", "1.0", "--map-reference", "good_mean"]) == 0
    bundle = load_bundle(copy)
    assert bundle.threshold["n_good"] == MIN_REFERENCE_IMAGES and bundle.reference_bank is None
    assert bundle.map_reference is not None and tuple(bundle.map_reference.shape) == (1, 1, 32, 32)
    _, val_ds, _ = load_training_data(bundle.cfg, data, "cat", bundle.cfg.train.seed)
    good = torch.stack([torch.as_tensor(np.asarray(val_ds[i])) for i in range(len(val_ds))])
    plain = Detector.from_bundle(bundle, "cpu", map_reference="none")
    with torch.inference_mode():
        raw_maps = plain(good)[0]
        maps, scores, _ = Detector.from_bundle(bundle, "cpu")(good)
    raw = raw_maps[:, 0].numpy()
    expected = reference_map(raw)
    assert np.allclose(bundle.map_reference[0, 0].numpy(), expected, rtol=1e-5)
    assert torch.allclose(maps, raw_maps / bundle.map_reference, rtol=1e-5)
    # quantile 1.0 = the largest held-back good score, each map divided by the reference of the others
    held_out = [(raw[i] / reference_map(np.delete(raw, i, axis=0))).max() for i in range(len(raw))]
    assert bundle.threshold["image"] == pytest.approx(float(max(held_out)), rel=1e-5)
    assert bundle.threshold["image"] > float(scores.max())  # the unbiased threshold is the higher one
    assert bundle.threshold["detect"]["map_reference"] == "good_mean"


def test_calibrate_fits_a_nearest_good_bank_on_the_training_split(tmp_path: Path) -> None:
    """The default reference: the bank holds every training image (thumbnail + pooled maps), the held-back
    images are scored against it, and the threshold is their largest score at quantile 1."""
    from anoddpm.data.datasets import load_training_data
    from anoddpm.detection.detector import Detector
    from anoddpm.detection.references import pool_bank_maps, thumbnail_features
    from eval.threshold import MIN_REFERENCE_IMAGES

    data = tmp_path / "data"
    make_synthetic_dataset(data, category="cat", size=32, n_train=MIN_REFERENCE_IMAGES + 6, n_test_good=1,
                           n_test_defect=1)
    copy = make_bundle(tmp_path / "model.pt", data, "cat")
    assert main(["calibrate", "--model", str(copy), "--quantile", "1.0", "--data", str(data), "--category", "cat"]) == 0
    bundle = load_bundle(copy)
    assert bundle.cfg.detect.map_reference == "nearest_good" and bundle.map_reference is None
    train_ds, val_ds, _ = load_training_data(bundle.cfg, data, "cat", bundle.cfg.train.seed)
    train = torch.stack([torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in train_ds.arrays])
    val = torch.stack([torch.as_tensor(np.asarray(val_ds[i])) for i in range(len(val_ds))])
    plain = Detector.from_bundle(bundle, "cpu", map_reference="none")
    with torch.inference_mode():
        train_maps = plain(train)[0]
        scores = Detector.from_bundle(bundle, "cpu")(val)[1]
    assert bundle.reference_bank["features"].shape[0] == len(train_ds) >= MIN_REFERENCE_IMAGES
    assert torch.allclose(bundle.reference_bank["features"], thumbnail_features(train))
    assert torch.allclose(bundle.reference_bank["maps"], pool_bank_maps(train_maps), rtol=1e-4, atol=1e-7)
    assert bundle.threshold["image"] == pytest.approx(float(scores.max()), rel=1e-5)
    assert load_bundle(copy).threshold["detect"]["reference_neighbours"] == 3


@pytest.mark.parametrize("change, reused", [({}, True), ({"steps": 3}, False), ({"threshold_quantile": 0.5}, True),
                                            ({"sampler": "ancestral"}, False)])
def test_stored_threshold_is_reused_only_for_thesame_detect_settingsion_settings(change: dict, reused: bool) -> None:
    detect = asdict(tiny_config().detect)
    assert same_detect_settings(detect, {**detect, **change}) is reused
    assert same_detect_settings(None, detect) is False


def test_stored_threshold_from_an_older_bundle_counts_missing_fields_as_defaults() -> None:
    detect = asdict(tiny_config().detect)
    older = {k: v for k, v in detect.items() if k != "seed"}
    assert same_detect_settings(older, detect) is True
    assert same_detect_settings(older, {**detect, "seed": 1}) is False


def test_calibrate_f1_uses_labelled_defects(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup
    copy = tmp_path / "model.pt"
    copy.write_bytes(model.read_bytes())
    assert main(["calibrate", "--model", str(copy), "--data", str(data), "--category", "cat",
                 "--method", "f1"]) == 0
    stored = load_bundle(copy).threshold
    assert stored["method"] == "f1" and stored["n_good"] == 2 + 4  # validation + test/good


def test_calibrate_f1_without_test_set_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_synthetic_dataset(tmp_path / "d", category="c", size=32, n_train=8, n_test_good=0,
                                    n_test_defect=0) / "train" / "good"
    model = make_bundle(tmp_path / "model.pt", folder, "")
    assert main(["calibrate", "--model", str(model), "--data", str(folder), "--method", "f1"]) == 2
    assert "test" in capsys.readouterr().err


def test_evaluate_nfbs_volumes(tmp_path: Path) -> None:
    from test_data import _brain_volume, _nifti  # the NFBS layout generator of the data tests

    root = tmp_path / "NFBS_Dataset"
    rng = np.random.default_rng(0)
    for sid in ("A001", "A002", "A003"):
        vol, brain, _ = _brain_volume(rng)
        _nifti(root / sid / f"sub-{sid}_ses-NFB3_T1w_brain.nii.gz", vol)
        _nifti(root / sid / f"sub-{sid}_ses-NFB3_T1w_brainmask.nii.gz", brain)
    vol, _, seg = _brain_volume(rng, lesion=True)
    _nifti(root / "anomalous" / "L01" / "case.nii.gz", vol)
    _nifti(root / "anomalous" / "L01" / "case_seg.nii.gz", seg)
    cfg = tiny_config().override("data", val_fraction=0.3, min_val_images=1)
    model = make_bundle(tmp_path / "model.pt", root, "", cfg)
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(root), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert metrics["n_images"] == len(rows) > 0 and 0 < metrics["n_defect"] < len(rows)
    assert len({r["name"] for r in rows}) == len(rows)  # one row per slice although the path repeats
    assert set(metrics["per_type_image_auroc"]) == {"lesion"}
