"""Scoring 1000 files, 5% of them bad, with a real interruption (SIGKILL) and a rerun."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from anoddpm.bundle import update_threshold
from test_evaluate_cli import make_bundle, tiny_config

REPO = Path(__file__).resolve().parents[1]
N_FILES, N_BAD = 1000, 50


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _make_inputs(folder: Path) -> set[str]:
    """1000 files: 950 small PNGs, 50 bad ones (empty, truncated, text); returns the bad paths."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = np.clip(rng.normal(128, 20, (N_FILES, 32, 32)), 0, 255).astype(np.uint8)
    bad: set[str] = set()
    for i in range(N_FILES):
        path = folder / f"{i:04d}.png"
        if i % (N_FILES // N_BAD) == 7:
            kind = i % 3
            path.write_bytes(b"" if kind == 0 else b"\x89PNG\r\n\x1a\n" + b"\0" * 20 if kind == 1 else b"text")
            bad.add(str(path))
        else:
            Image.fromarray(good[i]).save(path)
    return bad


def _score_cmd(model: Path, inputs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "anoddpm.cli", "score", "--model", str(model), "--input", str(inputs),
            "--out", str(out), "--batch-size", "16", "--steps", "1", "--depth", "50"]


def test_thousand_files_with_bad_ones_survive_a_kill_and_resume(tmp_path):
    cfg = tiny_config().override("detect", depth=50, steps=1)
    model = make_bundle(tmp_path / "model.pt", tmp_path, "none", cfg)
    update_threshold(model, {"image": 0.05, "pixel": None, "method": "quantile", "quantile": 0.99, "n_good": 2,
                             "detect": asdict(cfg.detect)})
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    bad = _make_inputs(inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(_score_cmd(model, inputs, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = out / "scores.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if scores.is_file() and scores.read_text().count("\n") > 100:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = scores.read_text().count("\n") - 1
    assert 0 < partial < N_FILES - N_BAD
    logged = {r["path"] for r in _rows(out / "errors.csv")} if (out / "errors.csv").is_file() else set()

    done = subprocess.run(_score_cmd(model, inputs, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == (1 if bad - logged else 0), done.stderr  # 1: bad files were tried in this run
    rows = _rows(scores)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == N_FILES - N_BAD
    assert not set(paths) & bad
    errors = {r["path"] for r in _rows(out / "errors.csv")}
    assert errors == bad
    assert set(paths) | errors == {str(p) for p in inputs.iterdir()}
