"""Line inspection with an exported model.onnx: files once, or a hot folder (`anoddpm inspect`, ``anoddpm.cli.inspect``).

Every image gives one JSON line in OUT/inspections.jsonl (flushed and fsynced per line):
``time, path, pred_score, pred_label, latency_ms`` (+ ``size, mtime_ns``, ``moved_to``, ``map``),
or ``time, path, error`` for a file that could not be read (once per path: a file logged unreadable that
later decodes, a writer that paused longer than the grace, gets its result with ``supersedes_error``); ``latency_ms`` runs from the start of
reading the file to its result (the inference of its whole batch included). ``--sort`` moves inspected files to
OUT/ok or OUT/ng (a clashing name gets a ``_1``, ``_2`` ... suffix; nothing is overwritten).
``--save-maps`` writes OUT/maps/<name>.png with the anomaly map scaled so that the pixel threshold
is mid-grey. No torch: numpy, onnxruntime and anoddpm.data.imageio only.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from anoddpm.platform.atomic import append_jsonl
from anoddpm.data.imageio import image_hw, save_png
from deploy.runtime import Inspector
from deploy.watch import Snapshot, claim, free_name, restore_claims, snapshot, watch_folder

LOG_NAME = "inspections.jsonl"

UNREADABLE_GRACE_NS = 2_000_000_000  # watch mode: an undecodable file must be this old to be logged


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Recorder:
    """Writes results: the JSONL log line first, then the map PNG and the ok/ng move."""

    def __init__(self, inspector: Inspector, out_dir: Path, sort: bool = False, save_maps: bool = False):
        self.inspector = inspector
        self.out_dir = out_dir
        self.log_path = out_dir / LOG_NAME
        self.sort = sort
        self.save_maps = save_maps
        self.counts = {"ok": 0, "ng": 0, "error": 0}
        self.failed: set[str] = set()  # paths logged unreadable and not inspected since
        out_dir.mkdir(parents=True, exist_ok=True)

    def error(self, path: Path, err: Exception, snap: Snapshot | None = None) -> dict[str, Any] | None:
        """Log an image that could not be inspected; a later version of a path already logged unreadable
        (a writer that paused longer than the grace, then went on) is not logged again. None when not logged."""
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

    def result(self, path: Path, result: dict[str, Any], latency_ms: float,
               snap: Snapshot | None = None) -> dict[str, Any]:
        """Log one inspected image, then save its map and sort it; returns the JSON record."""
        label = "ng" if result["pred_label"] else "ok"
        record: dict[str, Any] = {"time": _now(), "path": str(path), "pred_score": result["pred_score"],
                                  "pred_label": result["pred_label"], "latency_ms": round(latency_ms, 3)}
        if str(path) in self.failed:  # it was still being written when logged unreadable: that record is void
            self.failed.discard(str(path))
            self.counts["error"] -= 1
            record["supersedes_error"] = True
        if snap is not None:
            record.update(size=snap.size, mtime_ns=snap.mtime_ns)
        map_path = free_name(self.out_dir / "maps" / f"{path.stem}.png") if self.save_maps else None
        if map_path is not None:
            record["map"] = str(map_path)
        # A file replaced under the same name since it was read is a new image: leave it to be inspected.
        source = None
        if self.sort:
            source = path if snap is None else claim(snap)
        destination = free_name(self.out_dir / label / path.name) if source is not None else None
        if destination is not None:
            record["moved_to"] = str(destination)
        append_jsonl(self.log_path, record)
        if map_path is not None:
            save_png(map_path, np.clip(result["anomaly_map"] / (2.0 * self.inspector.pixel_threshold), 0.0, 1.0))
        if destination is not None:
            move(source, destination)
        self.counts[label] += 1
        print(f"{label.upper()}  {result['pred_score']:.6f}  {latency_ms:7.1f} ms  {path}", flush=True)
        return record


def move(source: Path, destination: Path) -> None:
    """Move without overwriting (a clash at the last moment gets a suffix)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(free_name(destination)))


def inspect_paths(recorder: Recorder, paths: Sequence[Path],
                  snapshots: Sequence[Snapshot | None] | None = None) -> list[Snapshot | None]:
    """Inspect files in batches; unreadable ones are logged and skipped. Returns the snapshots done with.

    With `snapshots` (watch mode) a file deleted before it was read, or changed while it was read,
    is neither logged nor returned, so the watcher offers it again when it is stable; an undecodable
    file is logged only once it has been unchanged for UNREADABLE_GRACE_NS (a slow writer may pause).
    """
    inspector = recorder.inspector
    snapshots = list(snapshots) if snapshots is not None else [None] * len(paths)
    done: list[Snapshot | None] = []
    for start in range(0, len(paths), inspector.batch_size):
        loaded, arrays, started = [], [], []
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
                if snap is not None and time.time_ns() - snap.mtime_ns < UNREADABLE_GRACE_NS:
                    continue  # a stalled writer may still finish it: retry until it has settled
                if snap is None or snapshot(path) == snap:
                    recorder.error(path, err, snap)
                    done.append(snap)
                continue
            if snap is not None and snapshot(path) != snap:
                continue  # still being written or replaced: read it again once stable
            loaded.append((path, snap))
            arrays.append(array)
            started.append(t0)
        if not arrays:
            continue
        if inspector.tile_size:  # images of any size; maps come back at each file's own size
            results = inspector.results(arrays, [image_hw(path) for path, _ in loaded])
        else:
            results = inspector.results(np.stack(arrays))
        finished = time.perf_counter()
        for (path, snap), result, t0 in zip(loaded, results, started):
            recorder.result(path, result, (finished - t0) * 1e3, snap)
            done.append(snap)
    return done


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The records of an inspections.jsonl; a torn last line (crash while writing) is ignored."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _previous_snapshots(recorder: Recorder) -> set[Snapshot]:
    """Snapshots logged by an earlier run; with --sort, finish moves a crash interrupted."""
    seen = set()
    for rec in read_log(recorder.log_path):
        if not {"path", "size", "mtime_ns"} <= rec.keys():
            continue
        snap = Snapshot(rec["path"], rec["size"], rec["mtime_ns"])
        if recorder.sort and rec.get("moved_to") and snapshot(snap.path) == snap:
            move(Path(snap.path), Path(rec["moved_to"]))
            continue
        seen.add(snap)
    return seen


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

    for path in restore_claims(folder):
        print(f"restored {path}: claimed for moving by a run that stopped before moving it", file=sys.stderr)
    watch_folder(folder, handle, poll_interval=poll_interval, stop=stop, seen=_previous_snapshots(recorder))
