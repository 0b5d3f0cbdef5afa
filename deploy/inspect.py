"""Line inspection with an exported model.onnx: files once, or a hot folder (`anoddpm inspect`, ``anoddpm.cli.inspect``).

Every image gives one strict JSON line in OUT/inspections.jsonl (flushed and fsynced per line):
``time, path, pred_score, pred_label, latency_ms, batch_size`` (+ ``size, mtime_ns``, ``moved_to``, ``map``), or
``time, path, error`` for a file that could not be inspected: unreadable, or a score or map that is not a finite
number (never a label). ``latency_ms`` is the image's own reading and preprocessing time plus its share of its
batch's inference (the batch time / ``batch_size``, the number of images inferred together).

In watch mode a file still being written is waited for: a PNG without its IEND chunk or a JPEG without its EOI
marker (``imageio.TruncatedImageError``) is logged only when it stays so for ``truncated_timeout_s`` after its
last change, other unreadable files once unchanged for UNREADABLE_GRACE_NS; a file logged unreadable that later
decodes gets its result with ``supersedes_error`` (once per path).

``--sort`` moves inspected files to OUT/ok or OUT/ng (a clashing name gets a ``_1``, ``_2`` ... suffix; nothing is
overwritten). The file is placed there completely (``deploy.watch.place``) and its map written before its line,
so a line's ``moved_to`` and ``map`` always name complete files; if the line cannot be written (a full disk),
both are removed again and the file keeps its place in the input. ``--save-maps`` writes OUT/maps/<stem>.png
(a free ``_N`` name on a clash; the line's ``map`` names it) with the anomaly map scaled so that the pixel
threshold is mid-grey. The log is data: a restart skips the files
it records and never moves anything because of it. A torn last line (a crash mid-write) is cut off at start,
lines that are not UTF-8 JSON are skipped. No torch: numpy, onnxruntime and anoddpm.data.imageio only.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from anoddpm.platform.atomic import append_jsonl
from anoddpm.data.imageio import image_hw, save_png
from anoddpm.data.truncation import TruncatedImageError
from deploy.runtime import Inspector
from deploy.watch import Snapshot, claim, free_name, place, restore_claims, same_file, snapshot, watch_folder

LOG_NAME = "inspections.jsonl"

UNREADABLE_GRACE_NS = 2_000_000_000  # watch mode: an undecodable file must be this old to be logged
TRUNCATED_TIMEOUT_S = 60.0  # watch mode: a file still being written (no end marker) is waited for this long


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _writable_log(out_dir: Path, log_path: Path) -> None:
    """Create OUT and cut a torn last line of its log (a run stopped mid-write); ValueError when OUT is not writable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as handle:
            size = handle.tell()
        if size:
            with open(log_path, "rb+") as handle:
                handle.seek(max(0, size - 65536))
                tail = handle.read()
                if not tail.endswith(b"\n"):
                    keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
                    handle.truncate(keep)
                    os.fsync(handle.fileno())
                    print(f"repaired {log_path}: cut a torn last line of {size - keep} bytes (a run stopped while "
                          "writing it; its file is inspected again)", file=sys.stderr)
    except OSError as err:
        raise ValueError(f"--out {out_dir} is not writable ({err.strerror or err}); choose another --out or fix its "
                         "permissions") from err


class Recorder:
    """Writes results: the map PNG and the ok/ng move first, then the JSONL line that names them."""

    def __init__(self, inspector: Inspector, out_dir: Path, sort: bool = False, save_maps: bool = False,
                 truncated_timeout_s: float = TRUNCATED_TIMEOUT_S):
        self.inspector = inspector
        self.out_dir = out_dir
        self.log_path = out_dir / LOG_NAME
        self.sort = sort
        self.save_maps = save_maps
        self.truncated_timeout_s = truncated_timeout_s
        self.counts = {"ok": 0, "ng": 0, "error": 0}
        self.failed: set[str] = set()  # paths logged unreadable and not inspected since
        _writable_log(out_dir, self.log_path)

    def error(self, path: Path, err: Exception | str, snap: Snapshot | None = None) -> dict[str, Any] | None:
        """Log an image that could not be inspected; a later version of a path already logged unreadable
        (a writer that paused longer than the timeout, then went on) is not logged again. None when not logged."""
        if snap is not None and str(path) in self.failed:
            return None
        self.failed.add(str(path))
        record: dict[str, Any] = {"time": _now(), "path": str(path), "error": str(err)}
        if snap is not None:
            record.update(size=snap.size, mtime_ns=snap.mtime_ns)
        append_jsonl(self.log_path, record)
        self.counts["error"] += 1
        print(f"ERROR {path}: {err}", file=sys.stderr)
        return record

    def result(self, path: Path, result: dict[str, Any], latency_ms: float, snap: Snapshot | None = None,
               batch_size: int = 1) -> dict[str, Any]:
        """Save the map, place the file in ok/ or ng/, then log the line naming them; returns the JSON record."""
        label = "ng" if result["pred_label"] else "ok"
        record: dict[str, Any] = {"time": _now(), "path": str(path), "pred_score": result["pred_score"],
                                  "pred_label": result["pred_label"], "latency_ms": round(latency_ms, 3),
                                  "batch_size": batch_size}
        supersedes = str(path) in self.failed  # it was still being written when logged unreadable
        if supersedes:
            record["supersedes_error"] = True
        if snap is not None:
            record.update(size=snap.size, mtime_ns=snap.mtime_ns)
        made: list[Path] = []  # files this result created, removed again if its line cannot be written
        source = None
        try:
            if self.save_maps:
                made.append(_save_map(self.out_dir / "maps" / f"{path.stem}.png", result["anomaly_map"],
                                      self.inspector.pixel_threshold))
                record["map"] = str(made[-1])
            # A file replaced under the same name since it was read is a new image: leave it to be inspected.
            if self.sort:
                source = path if snap is None else claim(snap)
            if source is not None:
                made.append(place(source, self.out_dir / label / path.name))
                record["moved_to"] = str(made[-1])
            append_jsonl(self.log_path, record)
        except BaseException:
            for created in made:
                created.unlink(missing_ok=True)
            if source is not None and source != path:
                os.rename(source, free_name(path))  # the claim gets its name back
            raise
        if source is not None:
            source.unlink()
        if supersedes:
            self.failed.discard(str(path))
            self.counts["error"] -= 1
        self.counts[label] += 1
        print(f"{label.upper()}  {result['pred_score']:.6f}  {latency_ms:7.1f} ms  {path}", flush=True)
        return record


def _save_map(path: Path, amap: np.ndarray, pixel_threshold: float | None) -> Path:
    """Write a map PNG (pixel threshold = mid-grey) under a free name, completely or not at all; returns its path."""
    scale = 2.0 * pixel_threshold if pixel_threshold else 1.0
    path = free_name(path)
    tmp = path.with_name(f".{path.name}.anoddpm-tmp")
    try:
        save_png(tmp, np.clip(np.asarray(amap) / scale, 0.0, 1.0))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _waiting(recorder: Recorder, err: ValueError, snap: Snapshot | None) -> bool:
    """Watch mode: True while an unreadable file may still be being written (retry it later)."""
    if snap is None:
        return False
    age_ns = time.time_ns() - snap.mtime_ns
    if isinstance(err, TruncatedImageError):
        return age_ns < recorder.truncated_timeout_s * 1e9
    return age_ns < UNREADABLE_GRACE_NS


def inspect_paths(recorder: Recorder, paths: Sequence[Path],
                  snapshots: Sequence[Snapshot | None] | None = None) -> list[Snapshot | None]:
    """Inspect files in batches; unreadable ones and non-finite results are logged and skipped. Returns the
    snapshots done with.

    With `snapshots` (watch mode) a file deleted before it was read, or changed while it was read,
    is neither logged nor returned, so the watcher offers it again when it is stable; a file still being
    written (``_waiting``) is left for a later poll.
    """
    inspector = recorder.inspector
    snapshots = list(snapshots) if snapshots is not None else [None] * len(paths)
    done: list[Snapshot | None] = []
    for start in range(0, len(paths), inspector.batch_size):
        loaded, arrays, reading = [], [], []
        for path, snap in zip(paths[start:start + inspector.batch_size], snapshots[start:start + inspector.batch_size]):
            t0 = time.perf_counter()
            try:
                array = inspector.load(path)
            except FileNotFoundError as err:
                if snap is None:
                    recorder.error(path, err)
                    done.append(snap)
                else:
                    print(f"skipped {path}: deleted before it was read", file=sys.stderr)
                continue
            except ValueError as err:
                if _waiting(recorder, err, snap):
                    continue  # a stalled writer may still finish it: retry until it has settled
                if snap is None or snapshot(path) == snap:
                    recorder.error(path, err, snap)
                    done.append(snap)
                continue
            if snap is not None and snapshot(path) != snap:
                continue  # still being written or replaced: read it again once stable
            loaded.append((path, snap))
            arrays.append(array)
            reading.append(time.perf_counter() - t0)
        if not arrays:
            continue
        t0 = time.perf_counter()
        names = [str(path) for path, _ in loaded]
        if inspector.tile_size:  # images of any size; maps come back at each file's own size
            results = inspector.results(arrays, [image_hw(path) for path, _ in loaded], names, errors="record")
        else:
            results = inspector.results(np.stack(arrays), names=names, errors="record")
        share = (time.perf_counter() - t0) / len(arrays)
        for (path, snap), result, read_s in zip(loaded, results, reading):
            if "error" in result:
                recorder.error(path, result["error"], snap)
            else:
                recorder.result(path, result, (read_s + share) * 1e3, snap, batch_size=len(arrays))
            done.append(snap)
    return done


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The records of an inspections.jsonl; a torn last line (crash while writing) and lines that are not UTF-8
    JSON objects are skipped (reported on stderr)."""
    if not log_path.is_file():
        return []
    records, bad = [], 0
    for line in log_path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            bad += 1
    if bad:
        print(f"{log_path}: skipped {bad} line(s) that are not UTF-8 JSON records", file=sys.stderr)
    return records


def _logged_snapshot(record: dict[str, Any]) -> Snapshot | None:
    path, size, mtime_ns = record.get("path"), record.get("size"), record.get("mtime_ns")
    if isinstance(path, str) and all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime_ns)):
        return Snapshot(path, size, mtime_ns)
    return None


def _previous_snapshots(records: list[dict[str, Any]], folder: Path) -> set[Snapshot]:
    """Files of `folder` an earlier run logged (inspected in place, or unreadable): a restart skips them.

    A logged move is never replayed: a file still in the folder that a line says was moved (a line of an older
    version written before its move) is inspected again."""
    seen = set()
    for rec in records:
        snap = _logged_snapshot(rec)
        if snap is not None and not rec.get("moved_to") and Path(snap.path).parent == folder:
            seen.add(snap)
    return seen


def _move_recorded(records: list[dict[str, Any]], out_dir: Path) -> Callable[[Path, Path], bool]:
    """finished(claimed, original) for restore_claims: the claim's move is logged, to a file inside OUT that is the
    same file (a crash came between its line and removing the claim), so the claim is only left over."""
    out_dir = out_dir.resolve()
    moved: dict[str, list[Path]] = {}
    for rec in records:
        if isinstance(rec.get("path"), str) and isinstance(rec.get("moved_to"), str):
            moved.setdefault(rec["path"], []).append(Path(rec["moved_to"]))

    def finished(claimed: Path, original: Path) -> bool:
        return any(dest.resolve().is_relative_to(out_dir) and same_file(claimed, dest)
                   for dest in moved.get(str(original), []))
    return finished


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` (the current batch finishes) instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch(recorder: Recorder, folder: str | Path, poll_interval: float, stop: threading.Event) -> None:
    """Inspect every new image of `folder` once, after it is completely written, until `stop` is set."""
    folder = Path(folder).resolve()

    def handle(ready: list[Snapshot]) -> list[Snapshot]:
        done = inspect_paths(recorder, [Path(s.path) for s in ready], ready)
        return [s for s in done if s is not None]

    records = read_log(recorder.log_path)
    for path in restore_claims(folder, _move_recorded(records, recorder.out_dir)):
        print(f"restored {path}: claimed for moving by a run that stopped before moving it", file=sys.stderr)
    watch_folder(folder, handle, poll_interval=poll_interval, stop=stop, seen=_previous_snapshots(records, folder))
