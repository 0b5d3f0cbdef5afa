"""`anoddpm score`: image files and folders -> DIR/scores.csv (+ errors.csv, optional map PNGs).

* Rows are appended and flushed as soon as a batch is scored, so an interrupted run keeps them;
  running again with the same ``--out`` skips every path already in scores.csv or errors.csv
  (delete a row from errors.csv to retry that file). At the end the file is rewritten sorted by
  path, one row per path.
* ``DIR/settings.json`` records the model, detection settings, preprocessing and threshold the rows were
  made with; a run into a DIR whose rows were made with others is refused (naming what differs), so
  stale rows are never kept as if made now. Detection flags that differ from the bundle's calibration
  recalibrate on its held-back good images first (``anoddpm.detection.guard``).
* Paths are stored exactly, names with newlines or undecodable bytes included (``surrogateescape``).
* A file named several ways (twice, through its folder, through ``..`` or a symlink) is scored once, under one
  path (``imageio.list_images``).
* Bad files (corrupt, empty, not an image, too many pixels, NaN or infinite pixels, an image too small for
  ``data.tile_scale``) go to errors.csv and stderr and are skipped; they never stop the run. So does an image
  whose score or map comes out non-finite: it gets an error row, never a label. The exit code is 1 when any
  image of this run could not be scored (or a named --input is missing), 0 otherwise; files of other
  suffixes found in folders are listed in errors.csv without failing the run.
* Under ``torchrun --nproc_per_node=N`` the sorted list of paths still to score is sharded
  ``rank::world_size``; each rank appends to ``scores.part-<rank>.csv`` and rank 0 merges all
  parts into scores.csv after a barrier.
* ``--save-maps`` writes ``DIR/maps/<file name>.png``, the input's suffix kept (``part.png`` -> ``part.png.png``,
  ``part.jpg`` -> ``part.jpg.png``: one map per input file; sub-folders mirror the inputs' common parent, so
  equal stems in different folders do not collide): 8-bit grey of ``map / (2 * threshold)``
  clipped to [0, 1], i.e. 128 is a pixel that alone would reach the image threshold (with
  ``--score max``) and 255 is twice that. Without a calibrated threshold the scale is 1. Maps have each
  input file's own size (bilinear; ``imageio.restore_map`` inverts the resize policy, a tiled map is resized
  from the file's size times ``data.tile_scale``).
* ``--save-overlays`` writes ``DIR/overlays/<file name>.png`` (same names and sub-folders): the map over the
  image at the file's size on a colour scale tied to the pixel threshold, the predicted region outlined
  (``eval.overlays``); it needs a calibrated bundle.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Any
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from anoddpm.bundle import load_bundle
from anoddpm.platform.atomic import atomic_write_bytes, atomic_write_text, out_folder
from anoddpm.platform.device import resolve_device
from anoddpm.platform.progress import progress
from anoddpm.cli.parser import detect_overrides
from anoddpm.config import Config
from anoddpm.data.imageio import image_hw, load_model_image, read_image, resize_map, restore_map, save_png
from anoddpm.data.listing import list_images
from anoddpm.detection.scoring_loop import batched
from anoddpm.detection.guard import calibrated_detector
from anoddpm.detection.tiling import WholeImages
from anoddpm.detection.settings import flag_of
from deploy.runtime import check_finite
from eval.overlays import save_overlay

SCORE_FIELDS = ("path", "pred_score", "pred_label", "threshold", "seconds")
ERROR_FIELDS = ("path", "error")
PATH_ERRORS = "surrogateescape"  # file names that are not UTF-8 round-trip through the CSVs byte for byte
SETTINGS_NAME = "settings.json"  # what the rows were made with: model, detection settings, threshold


def read_rows(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Complete rows of a CSV written by this module; a torn last line or malformed row is dropped."""
    if not path.is_file():
        return []
    text = _read_text(path)
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return []
    if tuple(rows[0]) != fields:
        raise ValueError(f"{path} exists but is not a file written by `anoddpm score` (header {rows[0]}, "
                         f"expected {list(fields)}); choose another --out")
    records = [dict(zip(fields, r)) for r in rows[1:] if len(r) == len(fields) and r[0]]
    return [r for r in records if "pred_score" not in r or _is_float(r["pred_score"])]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _CsvAppender:
    """Append rows to a CSV (header when new, torn last line repaired), flushed and fsynced per call."""

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields
        text = _to_csv(read_rows(path, fields), fields)
        if not path.is_file() or _read_text(path) != text:
            _write_text(path, text)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8", errors=PATH_ERRORS, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, lineterminator="\n")
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", PATH_ERRORS)


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8", PATH_ERRORS))


def _to_csv(rows: list[dict], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _merge(out: Path, name: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """scores.csv + every part file -> one sorted file, one row per path (first seen wins); parts removed."""
    main, parts = out / f"{name}.csv", sorted(out.glob(f"{name}.part-*.csv"))
    merged: dict[str, dict[str, str]] = {}
    for path in [main, *parts]:
        for row in read_rows(path, fields):
            merged.setdefault(row["path"], row)
    rows = [merged[k] for k in sorted(merged)]
    _write_text(main, _to_csv(rows, fields))
    for path in parts:
        path.unlink()
    return rows


def _done_paths(out: Path) -> set[str]:
    done: set[str] = set()
    for name, fields in (("scores", SCORE_FIELDS), ("errors", ERROR_FIELDS)):
        for path in [out / f"{name}.csv", *out.glob(f"{name}.part-*.csv")]:
            done.update(row["path"] for row in read_rows(path, fields))
    return done


def _dist_setup(device_name: str) -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device chosen for this rank); a process group only under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else None


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _map_name(path: Path, root: Path) -> Path:
    """maps/ and overlays/ name of an input: its path under `root` + ".png" (the suffix kept: one per file)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    return rel.with_name(rel.name + ".png")


def _report_error(path: str, error: str) -> dict[str, str]:
    print(f"anoddpm score: skipped {path}: {error}", file=sys.stderr)
    return {"path": path, "error": error}


def results_record(model: str | Path, detector: torch.nn.Module, threshold: float | None) -> dict:
    """What the rows of one --out folder were made with (DIR/settings.json): model, detection settings,
    data settings (preprocessing, tiling), image threshold."""
    cfg = detector.cfg.to_dict()
    return {"model": str(Path(model).resolve()), "detect": cfg["detect"], "data": cfg["data"], "threshold": threshold}


def check_results_record(out: Path, record: dict) -> None:
    """ValueError when --out already holds rows made with another model, settings or threshold than
    `record` (they would be kept as if made now); rows made with the same ones are resumed."""
    saved_path = out / SETTINGS_NAME
    has_rows = any(read_rows(out / f"{name}.csv", fields) for name, fields in (("scores", SCORE_FIELDS),
                                                                                ("errors", ERROR_FIELDS)))
    if not has_rows:
        return
    fix = (f"choose another --out, or delete {out / 'scores.csv'}, {out / 'errors.csv'} and {saved_path} "
           "to score again")
    if not saved_path.is_file():
        raise ValueError(f"{out / 'scores.csv'} records no settings ({SETTINGS_NAME} is missing), so its rows "
                         f"may come from other settings; {fix}")
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        differences = [flag_of(k) + f" {saved['detect'].get(k)} -> {v}"
                       for k, v in record["detect"].items() if saved["detect"].get(k) != v]
        differences += [f"{k} {saved.get(k)} -> {record[k]}" for k in ("model", "threshold", "data")
                        if saved.get(k) != record[k]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{saved_path} is not readable ({err}); {fix}") from err
    if differences:
        raise ValueError(f"{out / 'scores.csv'} holds rows made with other settings ({'; '.join(differences)}); "
                         f"{fix}")


def score_command(args: argparse.Namespace) -> int:
    """Score --input files/folders with --model into --out (see module docstring); returns the exit code."""
    rank, world, dist_device = _dist_setup(args.device)
    try:
        device = dist_device or resolve_device(args.device)
        out = out_folder(args.out)
        images, skipped = list_images(args.input, exclude=out)
        if not images:
            raise FileNotFoundError(f"no images found in --input {' '.join(map(str, args.input))}")
        bundle = load_bundle(args.model, map_location=device)
        view, calibration, _ = calibrated_detector(bundle, device, args.batch_size, detect_overrides(args), "score")
        threshold = None if calibration is None else float(calibration["image"])
        if rank == 0 and threshold is None:
            print("anoddpm score: the bundle has no threshold (run `anoddpm calibrate`); pred_label is left empty",
                  file=sys.stderr)
        scale = 2.0 * threshold if threshold else 1.0
        record = results_record(args.model, view.detector, threshold)
        check_results_record(out, record)
        overlay_threshold = _overlay_threshold(calibration, bundle, args)
        overlay_clear = _overlay_clear(calibration)

        absolute = [Path(os.path.abspath(p)) for p in images]
        root = Path(os.path.commonpath([p.parent for p in absolute]))
        done = _done_paths(out)
        todo = [p for p in absolute if str(p) not in done]
        _barrier(world)  # every rank has read the done set before anyone writes
        if rank == 0:
            atomic_write_text(out / SETTINGS_NAME, json.dumps(record, indent=2) + "\n")
        suffix = "" if world == 1 else f".part-{rank}"
        scores_file = _CsvAppender(out / f"scores{suffix}.csv", SCORE_FIELDS)
        errors_file = _CsvAppender(out / f"errors{suffix}.csv", ERROR_FIELDS)
        failed = 0
        if rank == 0:
            errors_file.write([_report_error(os.path.abspath(p), why) for p, why in skipped
                               if os.path.abspath(p) not in done])
            failed = sum(why == "not found" for _, why in skipped)
        failed += _score_shard(view, bundle.cfg, todo[rank::world], device, args, threshold, scale, root, out,
                     scores_file, errors_file, show_progress=rank == 0, overlay_threshold=overlay_threshold,
                              overlay_clear=overlay_clear)
        failed = _total(failed, world)
        if rank == 0:
            rows = _merge(out, "scores", SCORE_FIELDS)
            errors = _merge(out, "errors", ERROR_FIELDS)
            print(f"{len(rows)} images scored ({len(todo)} tried in this run), {len(errors)} errors "
                  f"-> {out / 'scores.csv'}")
            if failed:
                print(f"anoddpm score: {failed} file(s) of this run could not be scored (see "
                      f"{out / 'errors.csv'}); exit code 1", file=sys.stderr)
        _barrier(world)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 1 if failed else 0


def _total(count: int, world: int) -> int:
    """`count` summed over the ranks (every rank gets the sum; a barrier)."""
    if world == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _overlay_threshold(calibration: dict[str, Any] | None, bundle: Any, args: argparse.Namespace) -> float | None:
    """The pixel threshold of the calibration in use that overlays are drawn against (None without
    --save-overlays); without a calibration they cannot be drawn (ValueError)."""
    if not getattr(args, "save_overlays", False):
        return None
    from deploy.runtime import thresholds

    pixel = thresholds(calibration)[1]
    if pixel is None:
        raise ValueError(f"--save-overlays needs a calibrated threshold and {bundle.path} has none; "
                         f"run `anoddpm calibrate --model {bundle.path}` first")
    return pixel


def _overlay_clear(calibration: dict[str, Any] | None) -> float | None:
    """The map level below which overlays are transparent: the calibration's 0.99 quantile of held-back good map
    pixels (``good_cache``), as in `evaluate`'s overlays; None (the overlay's default cut) for older calibrations."""
    quantiles = ((calibration or {}).get("good_cache") or {}).get("pixel_quantiles") or {}
    clear = quantiles.get("0.99")
    return float(clear) if isinstance(clear, (int, float)) and math.isfinite(clear) and clear > 0 else None


def _load(path: Path, cfg: Config) -> np.ndarray:
    d = cfg.data
    return load_model_image(path, d.channels, d.image_size, d.resize_policy, d.tile_size, d.tile_scale)


def _file_sized(amap: np.ndarray, path: Path, cfg: Config) -> np.ndarray:
    """A map back at the file's own size (bilinear): a tiled map [h, w] of the image rescaled by
    data.tile_scale, or an S x S map through the inverse of the resize policy."""
    hw = image_hw(path)
    return resize_map(amap, *hw) if cfg.data.tile_size else restore_map(amap, hw, cfg.data.resize_policy)


def score_chunk(view: WholeImages, cfg: Config, chunk: list[Path], device: torch.device
                ) -> tuple[list[tuple[Path, float, np.ndarray, float]], list[dict[str, str]]]:
    """Read and score one batch of files -> ([(path, score, map [h, w], seconds per image)], error rows)."""
    good, arrays, errors = [], [], []
    for path in chunk:
        try:
            arrays.append(_load(path, cfg))
            good.append(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal
            errors.append(_report_error(str(path), str(err) or type(err).__name__))
    if not good:
        return [], errors
    result = view.forward_images(arrays, device)
    per_image = result.seconds / len(good)
    return [(p, float(s), m, per_image) for p, s, m in zip(good, result.scores, result.maps)], errors


def write_chunk(scored: list[tuple[Path, float, np.ndarray, float]], errors: list[dict[str, str]], cfg: Config,
                args: argparse.Namespace, threshold: float | None, scale: float, root: Path, out: Path,
                scores_file: _CsvAppender, errors_file: _CsvAppender, overlay_threshold: float | None = None,
                overlay_clear: float | None = None) -> int:
    """Rows (label only for a finite score), maps and overlays of one scored batch -> the number of files failed."""
    rows = []
    for path, score, amap, per_image in scored:
        try:
            check_finite(score, amap, str(path))
        except ValueError as err:
            errors.append(_report_error(str(path), str(err)))
            continue
        rows.append({"path": str(path), "pred_score": repr(score),
                     "pred_label": "" if threshold is None else int(score > threshold),
                     "threshold": "" if threshold is None else repr(threshold),
                     "seconds": f"{per_image:.6f}"})
        if args.save_maps or overlay_threshold is not None:
            full = _file_sized(amap, path, cfg)
        if args.save_maps:
            save_png(out / "maps" / _map_name(path, root), np.clip(full / scale, 0.0, 1.0))
        if overlay_threshold is not None:
            save_overlay(out / "overlays" / _map_name(path, root), read_image(path, cfg.data.channels),
                         full, overlay_threshold, clear=overlay_clear, title=f"{path.name}  score {score:.4g}  "
                         f"{'' if threshold is None else 'NG' if score > threshold else 'OK'}")
    scores_file.write(rows)
    errors_file.write(errors)
    return len(errors)


def _score_shard(view: WholeImages, cfg: Config, paths: list[Path], device: torch.device,
                 args: argparse.Namespace, threshold: float | None, scale: float, root: Path, out: Path,
                 scores_file: _CsvAppender, errors_file: _CsvAppender, show_progress: bool,
                 overlay_threshold: float | None = None, overlay_clear: float | None = None) -> int:
    """Score `paths` in batches, appending rows and error rows -> the number of files that failed."""
    if getattr(args, "engine", "local") == "ray":
        from anoddpm.cli.score_ray import score_paths_ray

        return score_paths_ray(paths, args, score_chunk, lambda scored, errors: write_chunk(
            scored, errors, cfg, args, threshold, scale, root, out, scores_file, errors_file, overlay_threshold,
            overlay_clear), show_progress)
    failed = 0
    with progress(total=len(paths), unit="img", desc="score", disable=not show_progress) as bar:
        for chunk in batched(paths, args.batch_size):
            scored, errors = score_chunk(view, cfg, chunk, device)
            failed += write_chunk(scored, errors, cfg, args, threshold, scale, root, out, scores_file, errors_file,
                                  overlay_threshold, overlay_clear)
            bar.update(len(chunk))
    return failed
