"""`anoddpm score --engine ray`: the files still to score streamed through Ray Data model actors.

Each actor loads the bundle once through the same path as local scoring (``load_bundle`` +
``detection.guard.calibrated_detector``) and scores batches with ``score.score_chunk``; the driver writes
each batch's rows, error rows, maps and overlays with ``score.write_chunk`` as it arrives, so a killed job
keeps every finished batch and resumes without rescoring them (the resume rules are `score`'s).
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from anoddpm.platform.progress import progress

MISSING_RAY = "--engine ray needs Ray: pip install 'anoddpm[ray]' (or pip install 'ray[data]'), or use --engine local"


def import_ray() -> Any:
    """The ray module, or ValueError with the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data extra must be present too
    except ImportError as err:
        raise ValueError(MISSING_RAY) from err
    return ray


class ScoreActor:
    """A Ray Data callable class: loads the bundle once, scores batches of paths (bytes) -> scores, maps, errors."""

    def __init__(self, model: str, device: str, batch_size: int, overrides: dict[str, Any], chunk_fn: Callable):
        from anoddpm.bundle import load_bundle
        from anoddpm.detection.guard import calibrated_detector
        from anoddpm.platform.device import resolve_device

        self.device = resolve_device(device)
        bundle = load_bundle(model, map_location=self.device)
        self.cfg = bundle.cfg
        self.view = calibrated_detector(bundle, self.device, batch_size, overrides, "score")[0]
        self.chunk_fn = chunk_fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """{"path": [bytes]} -> {"path", "score", "map" (np.save bytes), "seconds", "error"} per file."""
        paths = [Path(os.fsdecode(bytes(p))) for p in batch["path"]]
        scored, errors = self.chunk_fn(self.view, self.cfg, paths, self.device)
        out: dict[str, list] = {"path": [], "score": [], "map": [], "seconds": [], "error": []}
        for path, score, amap, seconds in scored:
            buf = io.BytesIO()
            np.save(buf, np.asarray(amap, dtype=np.float32))
            _append(out, path, score, buf.getvalue(), seconds, "")
        for row in errors:
            _append(out, Path(row["path"]), float("nan"), b"", 0.0, row["error"])
        return out


def _append(out: dict[str, list], path: Path, score: float, amap: bytes, seconds: float, error: str) -> None:
    for key, value in (("path", os.fsencode(path)), ("score", score), ("map", amap), ("seconds", seconds),
                       ("error", error)):
        out[key].append(value)


def score_paths_ray(paths: list[Path], args: argparse.Namespace, chunk_fn: Callable, write: Callable,
                    show_progress: bool) -> int:
    """Score `paths` in Ray model actors (each runs `chunk_fn`, i.e. ``score.score_chunk``), handing each batch to
    `write(scored, error rows)` (``score.write_chunk``) as it completes -> the number of files that failed."""
    from anoddpm.cli.parser import detect_overrides

    ray = import_ray()
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {args.workers})")
    if not paths:
        return 0
    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False)
    ds = ray.data.from_items([{"path": os.fsencode(p)} for p in paths])
    gpus = 1 if str(args.device).startswith("cuda") else 0  # one GPU per actor when scoring on CUDA
    scored_ds = ds.map_batches(ScoreActor, batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(
        size=args.workers), num_gpus=gpus, fn_constructor_kwargs={
        "model": str(Path(args.model).resolve()), "device": args.device, "batch_size": args.batch_size,
        "overrides": detect_overrides(args), "chunk_fn": chunk_fn})
    failed = 0
    with progress(total=len(paths), unit="img", desc="score (ray)", disable=not show_progress) as bar:
        for batch in scored_ds.iter_batches(batch_size=None, batch_format="numpy"):
            scored, errors = [], []
            for p, score, amap, seconds, error in zip(batch["path"], batch["score"], batch["map"],
                                                       batch["seconds"], batch["error"]):
                path = os.fsdecode(bytes(p))
                if error:
                    errors.append({"path": path, "error": str(error)})
                else:
                    scored.append((Path(path), float(score), np.load(io.BytesIO(bytes(amap))), float(seconds)))
            failed += write(scored, errors)
            bar.update(len(batch["path"]))
    return failed
