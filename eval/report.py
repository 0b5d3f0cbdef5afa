"""Evaluation report folder: metrics.json, per_image.csv, PNG plots and index.html.

The caller passes plain numpy arrays and the dict from ``eval.metrics.compute_metrics``::

    from eval.metrics import compute_metrics
    from eval.report import write_report

    metrics = compute_metrics(scores, labels, maps, masks, image_threshold=t, pixel_threshold=tp)
    write_report(out_dir, metrics=metrics, scores=scores, labels=labels, defect_types=types,
                 paths=paths, threshold=t, pixel_threshold=tp, seconds_per_image=sec,
                 inputs=images, reconstructions=recons, maps=maps, masks=masks,
                 extra={"category": "bottle", "calibration": bundle_threshold_dict})

Arrays: scores [N] float, labels [N] in {0,1}, defect_types [N] str ("good" for good images),
paths [N] str; optional inputs/reconstructions [N,C,H,W] in [0,1], maps [N,H,W], masks
[N,H,W] bool (only the few grid rows are drawn). Files written into out_dir:

* ``metrics.json``: the ``METRIC_KEYS`` (None when undefined: pixel metrics without any defect
  mask), ``threshold``, ``pixel_threshold``, ``seconds_per_image``, ``n_images``, ``n_defect``,
  ``n_defect_without_mask`` (defect images labelled without a mask, left out of pixel metrics),
  ``per_type_image_auroc`` {type: auroc}; with maps and masks also ``per_type_pixel_auroc``
  {type: auroc of its mask pixels against every defect-free pixel} and ``defect_pixel_share``
  {type: its share of all defect pixels, the weight it has in pixel AUROC}; at the threshold
  (``eval.metrics.operating_point``) ``false_rejects``, ``false_reject_rate`` (good images flagged, and their share
  of the ``n_good``), ``escapes``, ``escape_rate`` (defect images passed) and ``per_type_escape_rate``; with overlays
  ``overlay_clear`` (the map value below which they are transparent); plus every key of ``extra``.
* ``per_image.csv``: path, defect_type, label, pred_score, pred_label (``score > threshold``),
  then one column per entry of ``per_image`` (name -> [N] values).
* ``roc.png``, ``pr.png`` (only with both classes; the threshold's operating point marked), ``pixel_roc.png`` and
  ``pro.png`` (with maps and masks holding defect and defect-free pixels; the pixel threshold's point marked),
  ``histogram.png``, ``grid.png`` (with inputs and maps; colour bars), ``overlays/<name>.png`` for every image with ``overlays/page-NNN.html`` paging them
  (with inputs and maps; ``eval.overlays``; name = the ``per_image`` "name" column, else the index),
  and ``index.html`` linking them all.
"""
from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.metrics import (METRIC_KEYS, defect_pixel_share, operating_point, per_type_auroc, per_type_pixel_auroc,
                          pixel_operating_point, pixel_roc_curve, pro_curve, select, with_masks)
from eval.overlays import clear_level, save_overlay, write_overlay_pages
from eval.plots import plot_grid, plot_histogram, plot_pixel_roc, plot_pr, plot_pro, plot_roc

_TITLES = {
    "image_auroc": "Image AUROC", "image_ap": "Image AP", "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO (FPR <= 0.3)", "image_f1_max": "Image F1-max", "pixel_f1_max": "Pixel F1-max",
    "dice": "Dice @ pixel threshold", "iou": "IoU @ pixel threshold",
}


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> JSON builtins; NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def select_grid_rows(scores: np.ndarray, labels: np.ndarray, k: int = 8) -> list[int]:
    """Indices to show: highest-scoring defects, lowest-scoring defects (misses), highest-scoring goods."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    defects = np.flatnonzero(labels == 1)
    goods = np.flatnonzero(labels == 0)
    defects_desc = defects[np.argsort(-scores[defects], kind="stable")]
    goods_desc = goods[np.argsort(-scores[goods], kind="stable")]
    n_top = math.ceil(k / 3)
    candidates = [*defects_desc[:n_top], *defects_desc[::-1][:n_top], *goods_desc, *defects_desc]
    chosen: list[int] = []
    for index in candidates:
        if int(index) not in chosen:
            chosen.append(int(index))
        if len(chosen) == k:
            break
    return chosen


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _write_csv(path: Path, paths: Sequence[str], types: Sequence[str], labels: np.ndarray, scores: np.ndarray,
               threshold: float, per_image: Mapping[str, Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "pred_score", "pred_label", *per_image])
        for i in range(scores.size):
            extra = [_plain(np.asarray(per_image[name])[i]) for name in per_image]
            writer.writerow([str(paths[i]), str(types[i]), int(labels[i]), repr(float(scores[i])),
                             int(scores[i] > threshold), *extra])


def _write_overlays(out: Path, scores: np.ndarray, labels: np.ndarray, types: Sequence[str], names: Sequence[str],
                    threshold: float, pixel_threshold: float | None, inputs: Any, maps: Any, masks: Any,
                    aspects: Sequence[float] | None, clear: float | None) -> Path:
    """overlays/<name>.png for every image and overlays/page-NNN.html, highest score first -> the first page."""
    folder = out / "overlays"
    pixel = pixel_threshold if pixel_threshold is not None else threshold  # the map-unit threshold of pred_mask
    pngs, captions, classes = [], [], []
    for i in np.argsort(-scores, kind="stable"):
        ng = bool(scores[i] > threshold)
        rel = f"{names[i]}.png"
        save_overlay(folder / rel, inputs[i], maps[i], pixel, None if masks is None else masks[i],
                     title=f"{names[i]}  score {scores[i]:.4g}  {'NG' if ng else 'OK'}",
                     aspect=1.0 if aspects is None else float(aspects[i]), clear=clear)
        pngs.append(rel)
        captions.append(f"{names[i]}: score {scores[i]:.4g} ({'NG' if ng else 'OK'}), truth {types[i]}")
        classes.append("miss" if labels[i] and not ng else "false-alarm" if ng and not labels[i] else "")
    return write_overlay_pages(folder, pngs, captions, classes)[0]


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f} %"


def decisions(summary: Mapping[str, Any]) -> str:
    """One line: good parts rejected and defects passed at the threshold (from a metrics.json summary)."""
    n_good, n_defect = summary["n_images"] - summary["n_defect"], summary["n_defect"]
    return (f"at threshold {summary['threshold']:.6g}: {summary['false_rejects']} of {n_good} good parts rejected "
            f"(false rejects, {_percent(summary['false_reject_rate'])}), {summary['escapes']} of {n_defect} "
            f"defects passed (escapes, {_percent(summary['escape_rate'])})")


def _write_html(path: Path, summary: dict, images: Sequence[str], overlays: Path | None = None) -> None:
    metric_rows = "".join(f"<tr><td>{_TITLES[k]}</td><td>{_fmt(summary[k])}</td></tr>" for k in METRIC_KEYS)
    info_keys = ("threshold", "pixel_threshold", "seconds_per_image", "n_images", "n_defect")
    info_rows = "".join(f"<tr><td>{k}</td><td>{_fmt(summary[k])}</td></tr>" for k in info_keys)
    pixel, share = summary.get("per_type_pixel_auroc", {}), summary.get("defect_pixel_share", {})
    escape = summary["per_type_escape_rate"]
    type_rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{_fmt(v)}</td><td>{_fmt(pixel.get(t))}</td>"
                        f"<td>{_fmt(share.get(t))}</td><td>{_percent(escape.get(t))}</td></tr>"
                        for t, v in summary["per_type_image_auroc"].items())
    figures = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                      for name in images)
    overlay_link = "" if overlays is None else (
        f'<h2>Every image</h2><p><a href="{overlays.relative_to(path.parent).as_posix()}">Per-image overlays</a> '
        f"({summary['n_images']} images, highest score first): heat map over the image on a scale tied to the "
        "pixel threshold, predicted region and ground-truth outlines.</p>")
    path.write_text(f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>anoddpm evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:100%}}</style></head><body>
<h1>anoddpm evaluation</h1>
<h2>At the threshold</h2><p>{html.escape(decisions(summary))}</p>
<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{metric_rows}</table>
<table>{info_rows}</table>
<h2>Per defect type</h2><table><tr><th>defect type</th><th>image AUROC (vs good images)</th>
<th>pixel AUROC (vs defect-free pixels)</th><th>share of defect pixels</th><th>escape rate (passed at the
threshold)</th></tr>{type_rows}</table>
<h2>Plots</h2>{figures}
{overlay_link}
<p>Files: <a href="metrics.json">metrics.json</a>, <a href="per_image.csv">per_image.csv</a></p>
</body></html>
""")


def _pixel_curves(out: Path, maps: Any, masks: Any, summary: Mapping[str, Any], threshold: float) -> dict[str, Path]:
    """pixel_roc.png and pro.png with the pixel threshold's point, when masks hold both kinds of pixel."""
    flat = np.concatenate([np.ravel(m) for m in masks])
    if flat.all() or not flat.any():
        return {}
    point = pixel_operating_point(maps, masks, threshold)
    fpr, tpr = pixel_roc_curve(maps, masks)
    pro_fpr, pro = pro_curve(maps, masks)
    return {"pixel_roc.png": plot_pixel_roc(fpr, tpr, out / "pixel_roc.png", summary["pixel_auroc"],
                                            (point["fpr"], point["tpr"]), threshold),
            "pro.png": plot_pro(pro_fpr, pro, out / "pro.png", summary["aupro"], point=(point["fpr"], point["pro"]),
                                threshold=threshold)}


def write_report(out_dir: str | Path, *, metrics: Mapping[str, float | None], scores: np.ndarray,
                 labels: np.ndarray, defect_types: Sequence[str], paths: Sequence[str], threshold: float,
                 pixel_threshold: float | None = None, seconds_per_image: float | None = None,
                 extra: Mapping[str, Any] | None = None, per_image: Mapping[str, Sequence[Any]] | None = None,
                 inputs: np.ndarray | None = None, reconstructions: np.ndarray | None = None,
                 maps: np.ndarray | None = None, masks: np.ndarray | None = None,
                 grid_rows: int = 8, has_mask: np.ndarray | None = None, overlays: bool = True,
                 overlay_aspects: Sequence[float] | None = None, overlay_clear: float | None = None) -> dict[str, Path]:
    """Write the report folder (see module docstring) -> {file name: path written}; ``has_mask`` [N] bool
    as for ``compute_metrics`` (per-type pixel figures use only images whose mask is known); ``overlay_aspects``
    [N] row stretch of each overlay (``eval.overlays.save_overlay``'s aspect), default 1; ``overlay_clear`` the map
    value below which overlays are transparent (the calibration's good-image pixel quantile; default
    ``eval.overlays.clear_level`` of the good test images' maps, else a share of the pixel threshold)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n = scores.size
    per_image = dict(per_image or {})
    for name, values in {"labels": labels, "defect_types": defect_types, "paths": paths, **per_image}.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but scores has {n}")
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics is missing {missing}; pass the dict from eval.metrics.compute_metrics")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: _plain(metrics[k]) for k in METRIC_KEYS}
    summary.update(threshold=float(threshold), pixel_threshold=_plain(pixel_threshold),
                   seconds_per_image=_plain(seconds_per_image), n_images=int(n), n_defect=int(labels.sum()),
                   per_type_image_auroc=_plain(per_type_auroc(scores, labels, defect_types)))
    keep = with_masks(labels, has_mask)
    summary["n_defect_without_mask"] = int(((labels == 1) & ~np.asarray(has_mask if has_mask is not None
                                                                           else np.ones(n, bool), bool)).sum())
    if maps is not None and masks is not None and keep is not None:
        kept_types = [t for t, k in zip(defect_types, keep) if k]
        kept_maps, kept_masks = select(maps, keep), select(masks, keep)
        summary.update(per_type_pixel_auroc=_plain(per_type_pixel_auroc(kept_maps, kept_masks, kept_types)),
                       defect_pixel_share=_plain(defect_pixel_share(kept_masks, kept_types)))
    summary.update(_plain(operating_point(scores, labels, float(threshold), defect_types)))
    pixel_t = pixel_threshold if pixel_threshold is not None else float(threshold)  # map units, as for dice
    with_overlays = overlays and inputs is not None and maps is not None
    if with_overlays:
        good_maps = [maps[i] for i in np.flatnonzero(labels == 0)]
        summary["overlay_clear"] = _plain(overlay_clear if overlay_clear is not None else clear_level(good_maps))
    summary.update(_plain(dict(extra or {})))
    written = {"metrics.json": out / "metrics.json", "per_image.csv": out / "per_image.csv"}
    written["metrics.json"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _write_csv(written["per_image.csv"], paths, defect_types, labels, scores, float(threshold), per_image)
    if np.unique(labels).size == 2:
        written["roc.png"] = plot_roc(scores, labels, out / "roc.png", summary["image_auroc"], float(threshold))
        written["pr.png"] = plot_pr(scores, labels, out / "pr.png", summary["image_ap"], float(threshold))
    if maps is not None and masks is not None and keep is not None:
        written.update(_pixel_curves(out, select(maps, keep), select(masks, keep), summary, pixel_t))
    written["histogram.png"] = plot_histogram(scores, labels, float(threshold), out / "histogram.png")
    if inputs is not None and maps is not None and grid_rows > 0:
        rows = select_grid_rows(scores, labels, grid_rows)
        titles = [f"{Path(str(paths[i])).name} {defect_types[i]} {scores[i]:.4g}" for i in rows]
        written["grid.png"] = plot_grid(
            [inputs[i] for i in rows], None if reconstructions is None else [reconstructions[i] for i in rows],
            [maps[i] for i in rows], None if masks is None else [masks[i] for i in rows], out / "grid.png", titles,
            threshold=pixel_t)
    if with_overlays:
        names = per_image["name"] if "name" in per_image else [f"{i:05d}" for i in range(n)]
        written["overlays/page-001.html"] = _write_overlays(
            out, scores, labels, defect_types, [str(x) for x in names], float(threshold), pixel_threshold, inputs,
            maps, masks, overlay_aspects, summary["overlay_clear"])
    images = [name for name in ("roc.png", "pr.png", "pixel_roc.png", "pro.png", "histogram.png", "grid.png")
              if name in written]
    written["index.html"] = out / "index.html"
    _write_html(written["index.html"], summary, images, written.get("overlays/page-001.html"))
    return written
