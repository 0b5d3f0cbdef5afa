"""Hot-folder polling: hands each new image to a callback once, after it is completely written.

A file is identified by its ``Snapshot`` (path, size, mtime_ns): it is ready when the same snapshot
is seen at two consecutive polls. A name written again (after the file was moved away, or
rewritten in place) has a new snapshot and is therefore a new file. Before an inspected file is
moved it is claimed: renamed to a hidden name in its folder (atomic) and checked to still be the
snapshot that was inspected, so a file that took the name in the meantime is never moved
uninspected. ``place`` then puts a complete copy at the destination (a hard link, or a copy fsynced under a
hidden name and renamed), so a full disk never leaves a partial file there; the claim is removed only once the
move is recorded. numpy/torch-free.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from anoddpm.data.imageio import IMAGE_SUFFIXES
from anoddpm.platform.atomic import fsync_dir


CLAIM_PREFIX = ".anoddpm-claim."  # hidden name of a file claimed for moving (scan skips hidden files)


class Snapshot(NamedTuple):
    """What identifies one version of a file in the hot folder."""

    path: str
    size: int
    mtime_ns: int


def scan(folder: Path, unreadable: set[str] | None = None) -> dict[str, Snapshot]:
    """Top-level, non-hidden image files of `folder` -> {path: Snapshot}; vanished files are left out, and so
    are entries that cannot be read (a symlink loop, no permission), each reported once per `unreadable` set."""
    found: dict[str, Snapshot] = {}
    reported = set() if unreadable is None else unreadable
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
            except OSError as err:
                if entry.path not in reported:
                    reported.add(entry.path)
                    print(f"skipped {entry.path}: {err.strerror or err}", file=sys.stderr)
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
    if not (isinstance(poll_interval, (int, float)) and math.isfinite(poll_interval) and poll_interval > 0):
        raise ValueError(f"--poll-interval={poll_interval} must be a positive finite number of seconds")
    done = set(seen)
    previous: dict[str, Snapshot] = {}
    unreadable: set[str] = set()
    while not stop.is_set():
        current = scan(folder, unreadable)
        done &= set(current.values())  # a file that left the folder is forgotten: its name may return
        ready = sorted((s for p, s in current.items() if previous.get(p) == s and s not in done),
                       key=lambda s: (s.mtime_ns, s.path))
        if ready:
            done.update(handle(ready))
            done = {s for s in done if snapshot(s.path) == s}
        previous = current
        stop.wait(poll_interval)


def free_name(path: Path) -> Path:
    """`path` if free, else the first free `stem_N.suffix` (N = 1, 2, ...)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def claim(snap: Snapshot) -> Path | None:
    """Rename the file `snap` names to a hidden claim name beside it and return that path, if what was
    renamed is still `snap`; otherwise put it back (under a free name) and return None."""
    path = Path(snap.path)
    claimed = path.with_name(CLAIM_PREFIX + path.name)
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None
    st = os.stat(claimed)
    if (st.st_size, st.st_mtime_ns) == (snap.size, snap.mtime_ns):
        return claimed
    os.rename(claimed, free_name(path))  # a newer file under the same name: it will be inspected
    return None


def restore_claims(folder: str | Path, finished: Callable[[Path, Path], bool] = lambda claimed, path: False
                   ) -> list[Path]:
    """Give files claimed by a run that stopped before finishing their move their names back; returns them.

    A claim for which `finished(claimed, original path)` is True (its move was recorded: an identical file is at
    the logged destination) is removed instead."""
    restored = []
    for claimed in sorted(Path(folder).glob(CLAIM_PREFIX + "*")):
        original = claimed.with_name(claimed.name[len(CLAIM_PREFIX):])
        if finished(claimed, original):
            claimed.unlink()
            continue
        target = free_name(original)
        os.rename(claimed, target)
        restored.append(target)
    return restored


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` are one file (a hard link) or hold the same bytes."""
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block_a, block_b = fa.read(1 << 20), fb.read(1 << 20)
                if block_a != block_b:
                    return False
                if not block_a:
                    return True
    except OSError:
        return False


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES}


def place(source: Path, destination: Path) -> Path:
    """A complete copy of `source` at `destination`, or at the first free ``stem_N`` name beside it (nothing is
    overwritten); returns that path. A hard link on the same file system, else a copy written to a hidden
    temporary name, fsynced and renamed: a failure (a full disk) leaves nothing at the destination. `source`
    stays; remove it once the move is recorded."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    while True:
        target = free_name(destination)
        try:
            os.link(source, target)
        except FileExistsError:
            continue  # taken since free_name looked: try the next name
        except OSError as err:
            if err.errno not in _NO_LINK:
                raise
            _copy_then_rename(source, target)
        fsync_dir(target.parent)
        return target


def _copy_then_rename(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.anoddpm-tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
