"""A new quantile from the last calibration's good scores: `anoddpm calibrate --quantile Q` without a detection flag
on the same data changes the image threshold without running the model.

Every calibration keeps, in its threshold dict under ``good_cache`` (``good_cache``): the held-back good images'
scores (sorted; above CACHE_POINTS images an evenly spaced quantile summary of them), a few quantiles of their map
pixels (``pixel_quantiles``: the overlays' clear level) and the data they came from (``data_signature``: the folder
and a hash of its files' names, sizes and modification times). ``requantile`` gives the threshold a full
calibration at the new quantile gives: the same fitted states, the same good scores, only the quantile changes (the
pixel threshold is the fixed 0.999 pixel quantile of the same maps: it stays).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from eval.threshold import pixel_threshold, quantile_threshold

CACHE_POINTS = 1001  # up to this many held-back images the cache is their exact scores
PIXEL_QUANTILES = (0.9, 0.99, 0.999)


def _folder(root: str | Path, category: str | None) -> Path:
    """The folder a calibration reads: ROOT/category when it exists, else ROOT (as ``training_root`` resolves)."""
    root = Path(root)
    return (root / category if category and (root / category).is_dir() else root).resolve()


def data_signature(root: str | Path | None, category: str | None) -> dict[str, Any] | None:
    """{"folder", "files", "sha256"} of every file under the data folder (names, sizes, modification times: a
    listing, no file is read); None when there is no such folder."""
    if root is None or not Path(root).is_dir():
        return None
    folder = _folder(root, category)
    entries = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(parent) / name
            stat = path.stat()
            entries.append(f"{path.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
    digest = hashlib.sha256("".join(sorted(entries)).encode("utf-8", "surrogateescape")).hexdigest()
    return {"folder": str(folder), "files": len(entries), "sha256": digest}


def good_cache(scores: np.ndarray, maps: np.ndarray | Sequence[np.ndarray] | None, root: str | Path | None,
               category: str | None) -> dict[str, Any]:
    """What a calibration keeps to change its quantile later: sorted good scores [<= CACHE_POINTS] (exact up to
    CACHE_POINTS images), ``pixel_quantiles`` {q: map value} of the good maps ([M, H, W] or M maps; {} without) and
    the ``data`` signature of ROOT (+ category) they were scored from."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    kept = np.sort(scores) if scores.size <= CACHE_POINTS else np.quantile(scores, np.linspace(0.0, 1.0, CACHE_POINTS))
    has_maps = maps is not None and len(maps) > 0
    return {"scores": [float(s) for s in kept], "n": int(scores.size),
            "pixel_quantiles": {str(q): pixel_threshold(maps, q) for q in PIXEL_QUANTILES} if has_maps else {},
            "data": data_signature(root, category)}


def cache_problem(threshold: Mapping[str, Any] | None, root: str | Path, category: str | None) -> str | None:
    """Why the calibration `threshold` cannot give a new quantile without a model run (None: it can): no cached good
    scores, an F1 threshold, or data under ROOT (+ category) that is not what its good scores came from."""
    cache = (threshold or {}).get("good_cache")
    if not cache or not cache.get("scores"):
        return "the bundle's calibration keeps no good scores (made by an older anoddpm)"
    if threshold.get("method") != "quantile":
        return f"its threshold is {threshold.get('method')}-optimal, not a quantile"
    if cache.get("data") is None or cache["data"] != data_signature(root, category):
        return f"the good images under {_folder(root, category)} are not those it was calibrated on"
    return None


def requantile(threshold: Mapping[str, Any], quantile: float) -> dict[str, Any]:
    """The calibration `threshold` at another quantile of its cached good scores (``cache_problem`` is None)."""
    new = dict(threshold)
    new["image"] = quantile_threshold(np.asarray(threshold["good_cache"]["scores"]), quantile)
    new["quantile"] = float(quantile)
    return new
