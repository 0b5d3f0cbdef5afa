"""K-shot models (data.shots, `train --shots K`): the drawn files, leave-one-out calibration, info, errors, benchmark."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.cli import main
from anoddpm.cli.info import describe
from anoddpm.config import Config
from anoddpm.data.datasets import load_training_data
from anoddpm.data.shots import draw_shots
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.detection.calibration import fit_and_score_good
from anoddpm.detection.detector import Detector
from anoddpm.detection.fewshot import calibrate_shots, leave_one_out_folds
from anoddpm.detection.scoring_loop import score_component_maps
from anoddpm.detection.tiling import inspection_detector
from anoddpm.training.train import train

CPU = torch.device("cpu")
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy" / "model.pt"
N_TRAIN = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fewshot")
    make_synthetic_dataset(root, "syn", size=32, n_train=N_TRAIN, n_test_good=3, n_test_defect=4, seed=0)
    return root


def _cfg(shots: int, shots_seed: int = 0) -> Config:
    """Tiny model, 2 steps; the default scorer (residual + feature_memory fused by max: component scales fitted)."""
    return (Config().override("data", image_size=32, shots=shots, shots_seed=shots_seed)
            .override("model", preset="tiny").override("detect", depth=50, steps=1)
            .override("train", batch_size=4, max_steps=2, warmup_steps=1, log_every=1, sample_every=10_000,
                      anomaly_fraction=0.0)
            .override("head", enabled=False).override("backbone", image_size=64))


@pytest.fixture(scope="module")
def three_shot(data_root, tmp_path_factory) -> Path:
    return train(_cfg(3), data_root, "syn", tmp_path_factory.mktemp("k3") / "run", device="cpu")


def _shots(root: Path, cfg: Config) -> list[np.ndarray]:
    return list(load_training_data(cfg, root, "syn", cfg.train.seed)[0].arrays)


def test_shots_are_a_pure_nested_function_of_files_k_and_seed():
    files = [Path(f"/d/train/good/{i:03d}.png") for i in range(10)]
    four = draw_shots(files, 4, seed=0, where="/d")
    assert len(set(four)) == 4 and four == sorted(four)
    assert draw_shots(list(reversed(files)), 4, 0, "/d") == four  # the listing order does not matter
    assert set(draw_shots(files, 2, 0, "/d")) <= set(four)  # a larger K keeps a smaller K's shots
    assert draw_shots(files, 4, 1, "/d") != four
    assert draw_shots(files, 10, 5, "/d") == files
    for k, why in ((11, "only 10 are there"), (0, "a K-shot model needs at least one good image")):
        with pytest.raises(ValueError, match=rf"--shots {k} \(data.shots\): {why}; /d holds 10 good training image"):
            draw_shots(files, k, 0, "/d")


def test_k_shot_data_is_the_drawn_files_with_nothing_held_back(data_root):
    train_ds, val_ds, fingerprint = load_training_data(_cfg(3), data_root, "syn", seed=0)
    files = sorted((data_root / "syn" / "train" / "good").iterdir())
    drawn = [f.relative_to(data_root / "syn").as_posix() for f in draw_shots(files, 3, 0, data_root)]
    assert (len(train_ds), len(val_ds), fingerprint["n_train"], fingerprint["n_val"]) == (3, 0, 3, 0)
    assert fingerprint["shots"] == 3 and fingerprint["shot_files"] == drawn == train_ds.names
    assert load_training_data(_cfg(3), data_root, "syn", seed=0)[2]["shot_files"] == drawn  # same seed, same shots
    assert load_training_data(_cfg(3, shots_seed=1), data_root, "syn", seed=0)[2]["shot_files"] != drawn
    assert "shots" not in load_training_data(_cfg(0), data_root, "syn", seed=0)[2]  # all images: as before
    with pytest.raises(ValueError, match=rf"--shots 9 \(data.shots\): only {N_TRAIN} are there.*--shots 1\.\.{N_TRAIN}"):
        load_training_data(_cfg(9), data_root, "syn", seed=0)


def _loo_by_hand(bundle_path: Path, shots: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(leave-one-out scores [K], component scale [2]): shot i scored against states fitted on the others, with
    scales = median maxima the other left-out shots reached."""
    view = inspection_detector(Detector.from_bundle(load_bundle(bundle_path), CPU).eval(), 4)
    detector, states, maxima = view.detector, [], []
    for i, shot in enumerate(shots):
        fit_and_score_good(view, [shot], CPU, 4, bank_images=[s for j, s in enumerate(shots) if j != i])
        states.append(detector.fitted_state())
        maxima.append(score_component_maps(detector, [shot], CPU, reduce=lambda c: c.amax(dim=(2, 3)),
                                           referenced=True)[0])
    scores = []
    for i, shot in enumerate(shots):
        detector.reset_fitted_state()
        detector.load_fitted_state(states[i])
        detector.fusion.fit(np.concatenate([m for j, m in enumerate(maxima) if j != i]))
        scores.append(view.score_set([shot], CPU).scores[0])
    return np.array(scores), np.median(np.concatenate(maxima), axis=0)


def test_k_shot_training_calibrates_leave_one_out(three_shot, data_root):
    bundle = load_bundle(three_shot)
    assert bundle.cfg.data.shots == 3 and bundle.fingerprint["shots"] == 3
    assert len(bundle.fingerprint["shot_files"]) == 3 and bundle.fingerprint["n_val"] == 0
    t = bundle.threshold
    assert (t["shots"], t["leave_one_out"], t["n_good"], t["method"]) == (3, True, 3, "quantile")
    assert t["components"] == ["residual", "feature_memory"] and np.isfinite(t["image"]) and np.isfinite(t["pixel"])
    scores, scale = _loo_by_hand(three_shot, _shots(data_root, bundle.cfg))
    assert np.allclose(sorted(scores), t["good_cache"]["scores"], rtol=1e-5)
    assert t["image"] == pytest.approx(np.quantile(scores, bundle.cfg.detect.threshold_quantile), rel=1e-5)
    assert np.allclose(bundle.component_scale.numpy(), scale, rtol=1e-5)
    # why scales need left-out images: a shot in the final bank is at distance ~0 from it
    final = inspection_detector(Detector.from_bundle(bundle, CPU).eval(), 4).detector
    in_bank, _ = score_component_maps(final, _shots(data_root, bundle.cfg), CPU, referenced=True,
                                      reduce=lambda c: c.amax(dim=(2, 3)))
    assert in_bank[:, 1].max() < 0.05 * scale[1]


def test_a_k_shot_model_evaluates_and_info_names_its_shots(three_shot, data_root, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["evaluate", "--model", str(three_shot), "--data", str(data_root), "--category", "syn", "--out",
                     str(tmp_path / "report"), "--device", "cpu", "-q"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["threshold_source"] == "bundle" and np.isfinite(metrics["image_auroc"])
    assert metrics["calibration"]["leave_one_out"] is True
    few = describe(three_shot)["few_shot"]
    assert few == {"shots": 3, "shots_seed": 0, "shot_files": load_bundle(three_shot).fingerprint["shot_files"],
                   "leave_one_out": True}
    assert describe(LEGACY)["few_shot"] is None  # a bundle from before data.shots: all images, as it was


def test_one_shot_calibrates_on_its_derived_images_only_when_it_has_some(three_shot, data_root, tmp_path):
    shot = _shots(data_root, _cfg(3))[0]
    derived = [shot[:, ::-1].copy(), shot[:, :, ::-1].copy(), np.roll(shot, 3, axis=2)]
    folds = leave_one_out_folds([shot], [derived])
    assert len(folds) == 3 and all(len(fit) == 3 and len(out) == 1 for fit, out in folds)
    assert folds[1][1][0] is derived[1] and all(d is not derived[1] for d in folds[1][0])
    two = leave_one_out_folds(["a", "b"], [["a1"], ["b1", "b2"]])
    assert two == [(["b", "b1", "b2"], ["a"]), (["a", "a1"], ["b"])]  # a shot's derived images leave with it
    copy = shutil.copy(three_shot, tmp_path / "model.pt")
    t = calibrate_shots(copy, [shot], CPU, derived=[derived])
    assert (t["shots"], t["n_good"], t["leave_one_out"]) == (1, 3, True) and np.isfinite(t["image"])
    assert load_bundle(copy).threshold["image"] == t["image"]
    message = r"--shots 1: leave-one-out calibration needs at least 2 good images; give --shots 2 or more or add"
    with pytest.raises(ValueError, match=message):
        calibrate_shots(copy, [shot], CPU)
    with pytest.raises(ValueError, match=message):  # refused before any training step
        train(_cfg(1), data_root, "syn", tmp_path / "one", device="cpu")
    assert not (tmp_path / "one" / "checkpoint.pt").exists()


def test_no_map_reference_when_the_folds_are_too_small_for_one(three_shot, data_root, tmp_path):
    """3 shots + 6 derived each = 21 images would fit a nearest_good bank (>= 20), each fold's 14 would not: the
    bundle gets none, or its maps would be in other units than the threshold from the folds."""
    shots = _shots(data_root, _cfg(3))
    derived = [[np.clip(s + 0.01 * j, 0, 1).astype(np.float32) for j in range(1, 7)] for s in shots]
    copy = shutil.copy(three_shot, tmp_path / "model.pt")
    t = calibrate_shots(copy, shots, CPU, derived=derived)
    bundle = load_bundle(copy)
    assert bundle.cfg.detect.map_reference == "nearest_good" and t["n_good"] == 3
    assert bundle.reference_bank is None and bundle.map_reference is None


def test_shots_zero_or_too_many_on_the_command_line_is_one_line_naming_the_flag(data_root, tmp_path):
    for k, why in ((0, "a K-shot model needs at least one good image"), (N_TRAIN + 1, f"only {N_TRAIN} are there")):
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(["train", "--data", str(data_root), "--category", "syn", "--out", str(tmp_path / f"k{k}"),
                         "--shots", str(k), "--preset", "tiny", "--image-size", "32", "--device", "cpu", "-q"])
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"anoddpm train: error: --shots {k} (data.shots): {why}")
        assert f"holds {N_TRAIN} good training image(s)" in lines[0]


def test_benchmark_gives_a_row_per_k_draw_and_method_and_goes_on_after_a_failing_k(data_root, tmp_path, capsys):
    from benchmarks.fewshot import main as benchmark

    assert benchmark(["--data", str(data_root), "--category", "syn", "--shots", "2,1", "--draws", "1",
                      "--max-steps", "2", "--device", "cpu", "--out", str(tmp_path),
                      "--train-args", "--preset tiny --image-size 32 --batch-size 4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs = {(r["k"], r["method"]): r for r in rows if not r.get("summary")}
    assert set(runs) == {(2, "anoddpm"), (2, "patchcore_peer"), (1, "anoddpm"), (1, "patchcore_peer")}
    for key in ((2, "anoddpm"), (2, "patchcore_peer"), (1, "patchcore_peer")):
        assert 0.0 <= runs[key]["image_auroc"] <= 1.0 and runs[key]["fit_seconds"] >= 0, runs[key]
    assert "--shots 1: leave-one-out calibration needs at least 2" in runs[(1, "anoddpm")]["error"]
    summaries = {(r["k"], r["method"]): r for r in rows if r.get("summary")}
    assert summaries[(2, "anoddpm")]["image_auroc_mean"] == pytest.approx(runs[(2, "anoddpm")]["image_auroc"], abs=1e-4)
    assert (summaries[(1, "anoddpm")]["draws"], summaries[(1, "anoddpm")]["errors"]) == (0, 1)
    drawn = draw_shots(sorted((data_root / "syn" / "train" / "good").iterdir()), 2, 0, data_root)
    shot_files = load_bundle(tmp_path / "k2_draw0" / "run" / "model.pt").fingerprint["shot_files"]
    assert shot_files == [f.relative_to(data_root / "syn").as_posix() for f in drawn]  # --shots-seed = the draw
