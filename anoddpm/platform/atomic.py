"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the target's directory, is flushed and fsynced, then
`os.replace`d over the target; the directory is fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes 0600 files

def fsync_dir(directory: Path) -> None:
    """fsync a folder so a rename or a new file in it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders created); returns the path."""
    return _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` done atomically; returns the path."""
    import torch

    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one strict JSON line to `path` and fsync it, so a crash loses at most the line being written;
    a value that is not a finite number raises ValueError (a bare NaN is not JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def out_folder(path: str | Path) -> Path:
    """`path` as an output folder (created later by the writes); ValueError when it is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder (it is created when missing)")
    return path
