"""Which files are images to read: files and folders named on the command line -> image paths, one per file."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from anoddpm.data.imageio import IMAGE_SUFFIXES


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def list_images(paths: Sequence[str | Path],
                exclude: str | Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files and folders (recursive) -> (sorted image paths, one per resolved file, [(path, reason skipped)]).

    A file named several ways (twice, through its folder, through ``..`` or a symlink) is listed once, under its
    shortest spelling without ``..``. Hidden files (name starting with '.') inside folders are ignored
    silently, and so is everything inside `exclude` (a command's own output folder, so its maps are never
    inspected as inputs), files named there explicitly included.
    """
    images: dict[Path, Path] = {}  # resolved -> spelling
    skipped: list[tuple[Path, str]] = []
    excluded = None if exclude is None else Path(exclude).resolve()

    def add(f: Path) -> None:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((f, f"suffix {f.suffix or '(none)'} is not one of {', '.join(IMAGE_SUFFIXES)}"))
            return
        key = f.resolve()
        images[key] = min(images.get(key, f), f, key=lambda p: (".." in p.parts, len(str(p)), str(p)))

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if (f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                        and not _inside(f, excluded)):
                    add(f)
        elif p.is_file():
            if _inside(p, excluded):
                skipped.append((p, f"inside the output folder {exclude}"))
            else:
                add(p)
        else:
            skipped.append((p, "not found"))
    return sorted(images.values()), skipped
