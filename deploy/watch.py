"""Hot-folder polling: hands each new image to a callback once, after it is completely written.

A file is identified by its ``Snapshot`` (path, size, mtime_ns): it is ready when the same snapshot
is seen at two consecutive polls. A name written again (after the file was moved away, or
rewritten in place) has a new snapshot and is therefore a new file. numpy/torch-free.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from anoddpm.imageio import IMAGE_SUFFIXES


class Snapshot(NamedTuple):
    """What identifies one version of a file in the hot folder."""

    path: str
    size: int
    mtime_ns: int


def scan(folder: Path) -> dict[str, Snapshot]:
    """Top-level, non-hidden image files of `folder` -> {path: Snapshot}; vanished files are left out."""
    found: dict[str, Snapshot] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except FileNotFoundError:
                continue
            found[entry.path] = Snapshot(entry.path, st.st_size, st.st_mtime_ns)
    return found


def snapshot(path: str | Path) -> Snapshot | None:
    """The current Snapshot of one file, None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Snapshot(str(path), st.st_size, st.st_mtime_ns)


def watch_folder(folder: str | Path, handle: Callable[[list[Snapshot]], Iterable[Snapshot]], *,
                 poll_interval: float, stop: threading.Event, seen: Iterable[Snapshot] = ()) -> None:
    """Poll `folder` until `stop` is set; call `handle(ready)` with files stable across two polls.

    `handle` returns the snapshots it is done with (inspected or logged as unreadable); the others
    (deleted before read, changed while read) are offered again when they next become stable.
    `seen` are snapshots done in an earlier run, so a restart does not repeat them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"watch folder not found: {folder}")
    if poll_interval <= 0:
        raise ValueError(f"--poll-interval={poll_interval} must be positive")
    done = set(seen)
    previous: dict[str, Snapshot] = {}
    while not stop.is_set():
        current = scan(folder)
        done &= set(current.values())  # a file that left the folder is forgotten: its name may return
        ready = sorted((s for p, s in current.items() if previous.get(p) == s and s not in done),
                       key=lambda s: (s.mtime_ns, s.path))
        if ready:
            done.update(handle(ready))
            done = {s for s in done if snapshot(s.path) == s}
        previous = current
        stop.wait(poll_interval)
