"""Odd inputs on the production path (issue 21): each is scored or reported, nothing stops the batch."""
from __future__ import annotations

import csv
import errno
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoddpm.bundle import update_threshold
from anoddpm.cli.app import error_line, main
from anoddpm.data.imageio import preprocess
from anoddpm.data.synth import make_synthetic_dataset
from test_evaluate_cli import make_bundle, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(category folder of a generated dataset, bundle calibrated for its own settings)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cat = make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=6, n_test_good=2, n_test_defect=2)
    model = make_bundle(tmp / "model.pt", tmp / "data", "cat")
    update_threshold(model, {"image": 0.05, "pixel": None, "method": "quantile",
                             "detect": asdict(tiny_config().detect)})
    return cat, model


def _paths(csv_path: Path) -> list[str]:
    with csv_path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [row["path"] for row in csv.DictReader(f)]


def test_odd_file_names_are_stored_exactly_and_not_rescored(setup: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    cat, model = setup
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = cat / "train" / "good" / "000.png"
    names = ["line\nbreak.png", os.fsdecode(b"caf\xe9.png"), "plain.png"]  # a newline; Latin-1 bytes, not UTF-8
    for name in names:
        shutil.copy(good, inputs / name)
    out = tmp_path / "out"
    args = ["score", "--model", str(model), "--input", str(inputs), "--out", str(out)]
    assert main(args) == 0
    stored = _paths(out / "scores.csv")
    assert sorted(stored) == sorted(str(inputs / n) for n in names) and all(Path(p).is_file() for p in stored)
    capsys.readouterr()
    assert main(args) == 0
    assert "(0 tried in this run)" in capsys.readouterr().out  # every one was found in scores.csv


def test_out_inside_the_input_folder_is_not_scored(setup: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cat, model = setup
    inputs = tmp_path / "inputs"
    shutil.copytree(cat / "train" / "good", inputs)
    args = ["score", "--model", str(model), "--input", str(inputs), "--out", str(inputs / "out"), "--save-maps"]
    assert main(args) == 0 and main(args) == 0
    assert len(_paths(inputs / "out" / "scores.csv")) == 6  # its own map PNGs are not inputs
    assert list((inputs / "out" / "maps").glob("*.png"))


def test_nothing_to_score_is_an_error(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, model = setup
    assert main(["score", "--model", str(model), "--input", str(tmp_path / "typo"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found in --input" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["score", "evaluate"])
def test_out_that_is_a_file_is_one_line(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                        verb: str) -> None:
    cat, model = setup
    out = tmp_path / "taken"
    out.write_text("x")
    source = ["--input", str(cat / "train" / "good")] if verb == "score" else ["--data", str(cat)]
    assert main([verb, "--model", str(model), *source, "--out", str(out)]) in (1, 2)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [f"anoddpm {verb}: error: --out {out} is a file; "
                                                                       "give a folder (it is created when missing)"]
    assert out.read_text() == "x"


def test_one_training_image_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "good").mkdir()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "good" / "only.png")
    assert main(["train", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "run"), "--image-size", "32",
                 "--preset", "tiny", "--max-steps", "1", "--channels", "1"]) == 2
    assert "at least 2 good images" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_error_lines_name_the_file() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoint.pt")
    assert error_line(full) == (1, "disk full: /runs/a/checkpoint.pt; free space and run again (results written "
                                   "before are kept)")
    assert error_line(ValueError("bad\nvalue")) == (2, "bad value")
    code, text = error_line(RuntimeError("boom"))
    assert code == 1 and "--debug" in text


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["--debug", "info", str(tmp_path / "missing.pt")])
    assert main(["info", str(tmp_path / "missing.pt")]) == 2


def test_preprocess_takes_uint8_and_refuses_out_of_range_floats() -> None:
    grey = np.full((8, 8), 51, np.uint8)
    np.testing.assert_allclose(preprocess(grey, 8, "resize"), 0.2, atol=1e-6)
    np.testing.assert_allclose(preprocess(np.full((8, 8), 13107, np.uint16), 8, "resize"), 0.2, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(np.full((8, 8), 51.0, np.float32), 8, "resize")


def test_inspect_sort_with_out_inside_the_input_never_touches_its_outputs(tmp_path: Path) -> None:
    from onnx_toy import defect_image, good_image, make_toy_onnx, write_png

    model = make_toy_onnx(tmp_path / "m.onnx")
    inputs = tmp_path / "line"
    write_png(inputs / "a.png", good_image())
    write_png(inputs / "b.png", defect_image())
    out = inputs / "out"
    args = ["inspect", "--model", str(model), "--input", str(inputs), "--out", str(out), "--sort", "--save-maps"]
    assert main(args) == 0
    sorted_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted_files == ["maps/a.png", "maps/b.png", "ng/b.png", "ok/a.png"]
    assert main(args) == 2  # nothing left to inspect: its own outputs are not inputs
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted_files


def test_training_does_not_read_the_test_masks(tmp_path: Path) -> None:
    from anoddpm.data.datasets import load_training_data

    cat = make_synthetic_dataset(tmp_path / "data", category="cat", size=32, n_train=6, n_test_good=1, n_test_defect=2)
    for mask in (cat / "ground_truth").rglob("*.png"):
        mask.unlink()
        break
    train_ds, val_ds, _ = load_training_data(tiny_config(), tmp_path / "data", "cat", 0)
    assert len(train_ds) + len(val_ds) == 6
