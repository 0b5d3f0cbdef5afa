"""Hot-folder faults that used to stop the line or miscount a part (issues 21, 30): symlink loops, paused writers."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deploy.inspect import Recorder, inspect_paths, read_log
from deploy.runtime import Inspector
from deploy.watch import scan, snapshot
from onnx_toy import good_image, make_toy_onnx, write_png


def test_symlink_loop_is_reported_once_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    os.symlink(folder / "loop.png", folder / "loop.png")  # points at itself: stat() fails with ELOOP
    write_png(folder / "part.png", good_image())
    unreadable: set[str] = set()
    assert list(scan(folder, unreadable)) == [str(folder / "part.png")]
    assert list(scan(folder, unreadable)) == [str(folder / "part.png")]
    err = capsys.readouterr().err
    assert err.count("loop.png") == 1 and "skipped" in err


def _aged(path: Path, seconds: float = 5.0) -> None:
    """Set mtime in the past, as a writer that paused longer than the grace would leave it."""
    old = time.time() - seconds
    os.utime(path, (old, old))


def _write_in_pauses(recorder: Recorder, part: Path, complete: bytes, age_s: float) -> None:
    """Write `complete` to `part` in four chunks, inspecting each as the watcher would (a new snapshot each time)."""
    for chunk in (len(complete) // 4, len(complete) // 2, 3 * len(complete) // 4, len(complete)):
        part.write_bytes(complete[:chunk])
        _aged(part, age_s - chunk / len(complete))  # each chunk older than the unreadable grace
        inspect_paths(recorder, [part], [snapshot(part)])


def test_paused_writer_is_waited_for_without_an_error_record(tmp_path: Path) -> None:
    recorder = Recorder(Inspector(make_toy_onnx(tmp_path / "m.onnx")), tmp_path / "out")
    part = tmp_path / "part.png"
    _write_in_pauses(recorder, part, write_png(tmp_path / "full.png", good_image()).read_bytes(), 5.0)
    records = [r for r in read_log(recorder.log_path) if r["path"] == str(part)]
    assert len(records) == 1 and "error" not in records[0] and "supersedes_error" not in records[0]
    assert records[0]["pred_label"] is False
    assert recorder.counts == {"ok": 1, "ng": 0, "error": 0}


def test_file_truncated_past_the_timeout_is_logged_once_and_superseded(tmp_path: Path) -> None:
    recorder = Recorder(Inspector(make_toy_onnx(tmp_path / "m.onnx")), tmp_path / "out", truncated_timeout_s=3.0)
    part = tmp_path / "part.png"
    _write_in_pauses(recorder, part, write_png(tmp_path / "full.png", good_image()).read_bytes(), 5.0)
    records = [r for r in read_log(recorder.log_path) if r["path"] == str(part)]
    assert len(records) == 2 and "still being written" in records[0]["error"]
    assert records[1]["supersedes_error"] is True and "pred_score" in records[1]
    assert recorder.counts == {"ok": 1, "ng": 0, "error": 0}
