"""Hot-folder faults (issue 30): a torn or undecodable log, a read-only --out and a full disk recover or refuse with one
line; a crafted log line never moves a file (the inspection log is never replayed as a list of moves)."""
from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pytest

from anoddpm.cli import main
from deploy.inspect import Recorder, inspect_paths, read_log, watch
from deploy.runtime import Inspector
from deploy.watch import snapshot
from onnx_toy import defect_image, good_image, make_toy_onnx, write_png


def _strict_json(line: str) -> dict:
    """json.loads that refuses NaN / Infinity (what a strict JSON reader does)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_onnx(tmp_path_factory.mktemp("toy") / "model.onnx")



def _watch_once(toy: Path, folder: Path, out: Path, sort: bool = False, save_maps: bool = False,
                polls: int = 6) -> Recorder:
    """Run the watcher for a few polls (long enough to inspect what is there), then stop it."""
    recorder = Recorder(Inspector(toy), out, sort=sort, save_maps=save_maps)
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(recorder, folder, 0.05, stop), daemon=True)
    thread.start()
    time.sleep(polls * 0.05 + 0.5)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    return recorder


def test_torn_and_non_utf8_log_lines_are_recovered_on_restart(toy: Path, tmp_path: Path, capsys) -> None:
    folder, out = tmp_path / "hot", tmp_path / "out"
    write_png(folder / "a.png", good_image())
    write_png(folder / "b.png", defect_image())
    log = out / "inspections.jsonl"
    _watch_once(toy, folder, out)
    assert len(read_log(log)) == 2
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + b"\xff\xfe not utf-8\n" + lines[1][:25])  # b's line torn by a crash
    _watch_once(toy, folder, out)
    err = capsys.readouterr().err
    assert "cut a torn last line" in err and "skipped 1 line(s)" in err
    records = read_log(log)
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.png"]  # b inspected again, a not repeated
    assert log.read_bytes().count(b"\n") == 3 and log.read_bytes().endswith(b"\n")


def test_read_only_out_is_refused_with_one_line(toy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_png(tmp_path / "in" / "a.png", good_image())
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("deploy.inspect.open", read_only, raising=False)
    assert main(["inspect", "--model", str(toy), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("anoddpm inspect: error: --out") and "Read-only file system" in err[-1]


def test_full_disk_while_sorting_leaves_no_partial_file_and_no_line_then_recovers(toy: Path, tmp_path: Path,
                                                                                monkeypatch) -> None:
    folder, out = tmp_path / "hot", tmp_path / "out"
    path = write_png(folder / "part.png", defect_image())
    size = path.stat().st_size

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")  # ng/ on another disk: the file is copied

    def disk_full(src, dst, length=0):
        dst.write(src.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deploy.watch.os.link", no_link)
    monkeypatch.setattr("deploy.watch.shutil.copyfileobj", disk_full)
    recorder = Recorder(Inspector(toy), out, sort=True, save_maps=True)
    with pytest.raises(OSError, match="No space left"):
        inspect_paths(recorder, [path], [snapshot(path)])
    assert read_log(recorder.log_path) == [] and not list((out / "ng").iterdir())
    assert not list((out / "maps").iterdir()) and path.stat().st_size == size  # back in place, whole
    monkeypatch.undo()
    _watch_once(toy, folder, out, sort=True, save_maps=True)  # space freed, restarted
    (record,) = read_log(out / "inspections.jsonl")
    assert record["moved_to"] == str(out / "ng" / "part.png") and (out / "ng" / "part.png").stat().st_size == size
    assert Path(record["map"]).is_file() and not path.exists()


def test_full_disk_while_writing_the_line_puts_the_file_back(toy: Path, tmp_path: Path, monkeypatch) -> None:
    folder, out = tmp_path / "hot", tmp_path / "out"
    path = write_png(folder / "part.png", good_image())

    def torn(log_path, record):
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record)[:20])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deploy.inspect.append_jsonl", torn)
    with pytest.raises(OSError):
        inspect_paths(Recorder(Inspector(toy), out, sort=True), [path], [snapshot(path)])
    assert path.is_file() and not list((out / "ok").iterdir())
    monkeypatch.undo()
    _watch_once(toy, folder, out, sort=True)
    (record,) = read_log(out / "inspections.jsonl")
    assert record["moved_to"] == str(out / "ok" / "part.png") and Path(record["moved_to"]).is_file()


def test_a_crafted_log_line_never_moves_a_file(toy: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "hot", tmp_path / "out"
    folder.mkdir()
    secret = write_png(tmp_path / "elsewhere" / "secret.png", good_image())
    inside = write_png(folder / "part.png", defect_image())
    target = tmp_path / "anywhere" / "stolen.png"
    crafted = [{**snapshot(p)._asdict(), "pred_score": 0.0, "pred_label": False, "moved_to": str(target)}
               for p in (secret, inside)]
    out.mkdir()
    (out / "inspections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in crafted))
    _watch_once(toy, folder, out, sort=True)
    assert secret.is_file() and not target.exists() and not target.parent.exists()
    record = read_log(out / "inspections.jsonl")[-1]
    assert record["path"] == str(inside) and record["moved_to"] == str(out / "ng" / "part.png")
