"""deploy/inspect.py + deploy/watch.py: `anoddpm inspect` on files and on a hot folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anoddpm.cli import main as cli
from deploy.inspect import Recorder, inspect_paths, read_log, watch
from deploy.runtime import Inspector
from deploy.watch import CLAIM_PREFIX, claim, restore_claims, snapshot
from onnx_toy import defect_image, good_image, make_toy_onnx, write_png

REPO = Path(__file__).resolve().parents[1]
KEYS = {"time", "path", "pred_score", "pred_label", "latency_ms"}
POLL = 0.1


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_onnx(tmp_path_factory.mktemp("toy") / "model.onnx")


def _png_bytes(tmp_path: Path, img, name: str = "src.png") -> bytes:
    return write_png(tmp_path / name, img).read_bytes()


def test_files_mode_logs_sorts_and_skips_corrupt(toy, tmp_path):
    src = tmp_path / "in"
    write_png(src / "good.png", good_image())
    write_png(src / "bad.png", defect_image())
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_png(tmp_path / "out" / "ok" / "good.png", good_image(3))  # a name clash in ok/
    code = cli(["inspect", "--model", str(toy), "--input", str(src), "--out", str(tmp_path / "out"),
                "--sort", "--save-maps"])
    assert code == 1  # one unreadable file
    records = {Path(r["path"]).name: r for r in read_log(tmp_path / "out" / "inspections.jsonl")}
    assert set(records) == {"good.png", "bad.png", "corrupt.png"}
    assert "corrupt" in records["corrupt.png"]["error"] and "pred_score" not in records["corrupt.png"]
    assert KEYS <= records["good.png"].keys() and KEYS <= records["bad.png"].keys()
    assert records["good.png"]["pred_label"] is False and records["bad.png"]["pred_label"] is True
    assert records["bad.png"]["pred_score"] > 10 * records["good.png"]["pred_score"]
    assert records["good.png"]["latency_ms"] > 0
    assert (tmp_path / "out" / "ok" / "good_1.png").is_file() and (tmp_path / "out" / "ng" / "bad.png").is_file()
    assert records["good.png"]["moved_to"] == str(tmp_path / "out" / "ok" / "good_1.png")
    assert not (src / "good.png").exists() and (src / "corrupt.png").exists()
    assert Path(records["bad.png"]["map"]).is_file()


def _run_watch(toy: Path, folder: Path, out: Path, sort: bool = False):
    recorder = Recorder(Inspector(toy), out, sort=sort)
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(recorder, folder, POLL, stop), daemon=True)
    thread.start()
    return stop, thread


def _wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_watch_slow_writer_deleted_file_and_repeated_name(toy, tmp_path):
    folder, out = tmp_path / "hot", tmp_path / "out"
    folder.mkdir()
    data = _png_bytes(tmp_path, defect_image())
    stop, thread = _run_watch(toy, folder, out, sort=True)
    try:
        with open(folder / "slow.png", "wb") as handle:  # 1 s of chunks, each well within one poll
            for i in range(0, len(data), max(1, len(data) // 20)):
                handle.write(data[i:i + max(1, len(data) // 20)])
                handle.flush()
                time.sleep(0.05)
        (folder / "gone.png").write_bytes(data)
        (folder / "gone.png").unlink()  # deleted before it was stable
        log = out / "inspections.jsonl"
        _wait_for(lambda: len(read_log(log)) == 1 and (out / "ng" / "slow.png").exists())
        (folder / "slow.png").write_bytes(data)  # the same name again, after it was moved
        _wait_for(lambda: len(read_log(log)) == 2)
        time.sleep(5 * POLL)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    records = read_log(out / "inspections.jsonl")
    assert [Path(r["path"]).name for r in records] == ["slow.png", "slow.png"]
    assert all(KEYS <= r.keys() and r["pred_label"] is True and r["size"] == len(data) for r in records)
    assert sorted(p.name for p in (out / "ng").iterdir()) == ["slow.png", "slow_1.png"]


def test_watch_restart_does_not_repeat_but_rewrite_is_new(toy, tmp_path):
    folder, out = tmp_path / "hot", tmp_path / "out"
    write_png(folder / "a.png", good_image())
    write_png(folder / "b.png", defect_image())
    log = out / "inspections.jsonl"
    stop, thread = _run_watch(toy, folder, out)
    _wait_for(lambda: len(read_log(log)) == 2)
    stop.set()
    thread.join(5)
    stop, thread = _run_watch(toy, folder, out)
    time.sleep(6 * POLL)
    assert len(read_log(log)) == 2
    write_png(folder / "a.png", defect_image(1))
    os.utime(folder / "a.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    _wait_for(lambda: len(read_log(log)) == 3)
    stop.set()
    thread.join(5)
    last = read_log(log)[-1]
    assert Path(last["path"]).name == "a.png" and last["pred_label"] is True


def test_deleted_before_read_is_skipped_silently(toy, tmp_path):
    path = write_png(tmp_path / "x.png", good_image())
    snap = snapshot(path)
    path.unlink()
    recorder = Recorder(Inspector(toy), tmp_path / "out")
    assert inspect_paths(recorder, [path], [snap]) == []
    assert read_log(recorder.log_path) == []


def test_claim_holds_only_the_inspected_version_and_a_crash_leaves_it_restorable(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"first")
    inspected = snapshot(path)
    path.write_bytes(b"second, longer")  # replaced between the check and the move
    assert claim(inspected) is None
    assert path.read_bytes() == b"second, longer" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    claimed = claim(snapshot(path))
    assert claimed == tmp_path / (CLAIM_PREFIX + "a.png") and not path.exists()
    assert restore_claims(tmp_path) == [path] and path.read_bytes() == b"second, longer"


def test_sorting_never_moves_a_file_that_replaced_the_inspected_one(toy, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    path = write_png(folder / "x.png", good_image())
    inspected = snapshot(path)
    recorder = Recorder(Inspector(toy), tmp_path / "out", sort=True)
    result = recorder.inspector.results(recorder.inspector.load(path)[None])[0]
    write_png(path, defect_image())  # a new image under the same name, after the last check
    os.utime(path, ns=(inspected.mtime_ns + 10**9, inspected.mtime_ns + 10**9))
    monkeypatch.setattr("deploy.inspect.snapshot", lambda p: inspected)  # the check saw the old version
    record = recorder.result(path, result, 1.0, inspected)
    assert "moved_to" not in record and not (tmp_path / "out" / "ok").exists()
    assert [p.name for p in folder.iterdir()] == ["x.png"] and snapshot(path) != inspected


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
from anoddpm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_without_torch(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BLOCK_TORCH, "inspect", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_inspect_without_torch(toy, tmp_path):
    write_png(tmp_path / "in" / "bad.png", defect_image())
    proc = _cli_without_torch("--model", str(toy), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    records = read_log(tmp_path / "out" / "inspections.jsonl")
    assert len(records) == 1 and records[0]["pred_label"] is True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_watch_stops_cleanly_on_signal_without_torch(toy, tmp_path, sig):
    folder, out = tmp_path / "hot", tmp_path / "out"
    folder.mkdir()
    proc = _cli_without_torch("--model", str(toy), "--watch", str(folder), "--out", str(out),
                              "--poll-interval", str(POLL))
    try:
        write_png(folder / "a.png", good_image())
        _wait_for(lambda: len(read_log(out / "inspections.jsonl")) == 1, timeout=30)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "inspected 1 image(s): 1 ok, 0 ng" in stderr
    line = (out / "inspections.jsonl").read_text().splitlines()[0]
    assert KEYS <= json.loads(line).keys()


def test_watch_logs_a_corrupt_file_once_it_has_settled(toy, tmp_path):
    folder, out = tmp_path / "hot", tmp_path / "out"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    log = out / "inspections.jsonl"
    stop, thread = _run_watch(toy, folder, out)
    try:
        time.sleep(10 * POLL)  # stable but younger than the grace period: not logged yet
        assert read_log(log) == []
        _wait_for(lambda: len(read_log(log)) == 1)
        time.sleep(5 * POLL)
    finally:
        stop.set()
        thread.join(5)
    records = read_log(log)
    assert len(records) == 1 and "error" in records[0] and records[0]["path"].endswith("broken.png")
