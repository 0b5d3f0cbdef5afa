"""`anoddpm score`: bad files skipped, resumable, deterministic, sharded under torchrun."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoddpm.bundle import update_threshold
from anoddpm.cli import main
from anoddpm.cli.score import SCORE_FIELDS
from anoddpm.data.synth import make_synthetic_dataset
from test_evaluate_cli import make_bundle, tiny_config

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = {"image": 0.05, "pixel": 0.02, "method": "quantile", "quantile": 0.99, "n_good": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder with 18 good images + 2 corrupt files + 1 text file, calibrated bundle)."""
    tmp = tmp_path_factory.mktemp("score")
    cat = make_synthetic_dataset(tmp / "data", category="cat", size=32, n_train=10, n_test_good=4, n_test_defect=4)
    inputs = tmp / "inputs"
    shutil.copytree(cat / "train" / "good", inputs / "a")
    (inputs / "b").mkdir()
    for src in sorted((cat / "test").rglob("*.png")):
        shutil.copy(src, inputs / "b" / f"{src.parent.name}_{src.name}")
    (inputs / "b" / "empty.png").write_bytes(b"")
    (inputs / "b" / "truncated.png").write_bytes((cat / "train" / "good" / "000.png").read_bytes()[:60])
    (inputs / "b" / "notes.txt").write_text("not an image")
    model = make_bundle(tmp / "model.pt", tmp / "data", "cat")
    update_threshold(model, {**THRESHOLD, "detect": asdict(tiny_config().detect)})  # calibrated for its settings
    return inputs, model


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _score(model: Path, inputs: list[Path], out: Path, *extra: str, code: int = 0) -> list[dict[str, str]]:
    """Run `score`, check its exit code (1 when a file failed) -> the rows of scores.csv."""
    assert main(["score", "--model", str(model), "--input", *map(str, inputs), "--out", str(out),
                 "--batch-size", "4", *extra]) == code
    return _rows(out / "scores.csv")


@pytest.fixture(scope="module")
def reference(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """One uninterrupted single-process run over all inputs with --save-maps: (out dir, rows)."""
    inputs, model = setup
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, _score(model, [inputs], out, "--save-maps", code=1)  # two unreadable files


def test_bad_files_are_reported_and_skipped(reference: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = reference
    assert len(rows) == 18 and list(rows[0]) == list(SCORE_FIELDS)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    errors = {Path(r["path"]).name: r["error"] for r in _rows(out / "errors.csv")}
    assert set(errors) == {"empty.png", "truncated.png", "notes.txt"}
    assert "empty" in errors["empty.png"] and "truncated" in errors["truncated.png"]
    assert "suffix" in errors["notes.txt"]
    for r in rows:
        assert r["pred_label"] == str(int(float(r["pred_score"]) > 0.05)) and float(r["threshold"]) == 0.05
    arr = np.asarray(Image.open(out / "maps" / "a" / "000.png.png"))
    assert arr.dtype == np.uint8 and arr.shape == (32, 32)
    assert len(list((out / "maps").rglob("*.png"))) == 18


def test_bad_files_go_to_stderr(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs, model = setup
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 6_000)).save(huge)  # 60 M pixels in a small file: over the decode limit
    bad = [inputs / "b" / "empty.png", inputs / "b" / "truncated.png", huge, tmp_path / "missing.png"]
    assert _score(model, bad, tmp_path / "out", code=1) == []
    err = capsys.readouterr().err
    assert all(p.name in err for p in bad)
    errors = {Path(r["path"]).name: r["error"] for r in _rows(tmp_path / "out" / "errors.csv")}
    assert set(errors) == {p.name for p in bad}
    assert "max_pixels" in errors["huge.png"] and "not found" in errors["missing.png"]


def test_foreign_scores_csv_is_not_overwritten(setup: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    inputs, model = setup
    (tmp_path / "scores.csv").write_text("a,b\n1,2\n")
    assert main(["score", "--model", str(model), "--input", str(inputs / "a"), "--out", str(tmp_path)]) == 2
    assert "not a file written by" in capsys.readouterr().err
    assert (tmp_path / "scores.csv").read_text() == "a,b\n1,2\n"


def test_same_scores_twice(setup: tuple[Path, Path], tmp_path: Path) -> None:
    inputs, model = setup
    files = sorted((inputs / "a").glob("*.png"))[:4]
    first = _score(model, files, tmp_path / "one")
    second = _score(model, files, tmp_path / "two")
    assert len(first) == 4
    assert [(r["path"], r["pred_score"]) for r in first] == [(r["path"], r["pred_score"]) for r in second]


def test_resume_after_interruption_has_no_duplicate_or_missing_rows(
        setup: tuple[Path, Path], reference: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    inputs, model = setup
    full = reference[1]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(reference[0] / "settings.json", out)  # what the interrupted run was made with
    kept = [{**r, "seconds": "123.0"} for r in full[:14]]  # marks rows that must not be rescored
    with (out / "scores.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCORE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        f.write(full[14]["path"] + ",0.1")  # torn last line of the interrupted run
    rows = _score(model, [inputs], out, code=1)  # the unreadable files are tried again
    assert [r["path"] for r in rows] == [r["path"] for r in full]
    assert sum(r["seconds"] == "123.0" for r in rows) == 14
    np.testing.assert_allclose([float(r["pred_score"]) for r in rows], [float(r["pred_score"]) for r in full],
                               rtol=1e-5)
    # a third run scores nothing and changes nothing, errors are not duplicated
    assert _score(model, [inputs], out) == rows
    assert len(_rows(out / "errors.csv")) == 3


@pytest.mark.slow
def test_torchrun_two_ranks_merge_equals_single_process(
        setup: tuple[Path, Path], reference: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    inputs, model = setup
    single = reference[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "anoddpm", "score", "--model", str(model), "--input", str(inputs),
           "--out", str(tmp_path / "dist"), "--batch-size", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # two unreadable files
    assert "2 file(s) of this run could not be scored" in proc.stderr
    merged = _rows(tmp_path / "dist" / "scores.csv")
    assert [r["path"] for r in merged] == [r["path"] for r in single]
    assert [r["pred_label"] for r in merged] == [r["pred_label"] for r in single]
    np.testing.assert_allclose([float(r["pred_score"]) for r in merged],
                               [float(r["pred_score"]) for r in single], rtol=1e-5)
    assert not list((tmp_path / "dist").glob("*.part-*.csv"))
    assert len(_rows(tmp_path / "dist" / "errors.csv")) == 3
