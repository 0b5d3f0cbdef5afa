"""Per-image overlays: the anomaly map over the image on a scale tied to the threshold, with contours.

The map is shown as ``map / threshold`` (the pixel threshold) on a fixed scale from 0 to ``SCALE_MAX``: the
threshold always sits at the middle of the colour bar, marked there, whatever the model's units. The colour is
fully transparent up to the *clear level*, a map value tied to the good images (``clear_level``: their
``CLEAR_QUANTILE`` pixel quantile, so about 99 % of good pixels show the bare image), rises to ``NEAR_ALPHA`` at
the threshold and is ``MAX_ALPHA`` above it: a good part looks clean, a flagged region stands out. Without a clear
level it is ``FADE_BELOW`` of the threshold. The predicted region (``map > threshold``) is outlined in white, the
ground truth in dashed green. ``write_overlay_pages`` pages PNGs into HTML.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

SCALE_MAX = 2.0  # colour scale: 0 .. 2 x threshold
FADE_BELOW = 0.75  # without a clear level: transparent below this share of the threshold
CLEAR_QUANTILE = 0.99  # the clear level: this quantile of the good images' map pixels
NEAR_ALPHA = 0.3  # opacity just below the threshold (the clear level -> the threshold: 0 -> NEAR_ALPHA)
MAX_ALPHA = 0.7  # opacity above the threshold (flagged pixels)
_CLEAR_PIXELS = 2_000_000  # clear_level reads at most this many pixels, evenly strided
CMAP = "turbo"
PER_PAGE = 24


def _display(image: np.ndarray) -> np.ndarray:
    """[C, H, W] or [H, W(, C)] in [0, 1] -> [H, W] or [H, W, 3] for imshow."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def clear_level(good_maps: np.ndarray | Sequence[np.ndarray], q: float = CLEAR_QUANTILE) -> float | None:
    """The q-quantile of the pixels of good images' maps ([M, H, W] or M maps [H_i, W_i]): below it an overlay is
    transparent; None without any pixel or with a value that is not finite."""
    values = np.concatenate([np.ravel(np.asarray(m, np.float64)) for m in good_maps]) if len(good_maps) else np.zeros(0)
    values = values[:: max(1, values.size // _CLEAR_PIXELS)]
    if values.size == 0 or not np.all(np.isfinite(values)):
        return None
    return float(np.quantile(values, q))


def _clear_ratio(threshold: float, clear: float | None) -> float:
    """The clear level as a share of the threshold, in [0, 1] (FADE_BELOW without one)."""
    if clear is None or not np.isfinite(clear):
        return FADE_BELOW
    return float(np.clip(clear / threshold, 0.0, 1.0))


def overlay_rgba(amap: np.ndarray, threshold: float, clear: float | None = None) -> np.ndarray:
    """Map [H, W] -> RGBA float [H, W, 4]: colour of map / threshold on 0..SCALE_MAX; alpha 0 up to `clear` (map
    units, ``clear_level``; default FADE_BELOW x threshold), rising linearly to NEAR_ALPHA at the threshold,
    MAX_ALPHA above it (``map > threshold``: flagged)."""
    if not threshold > 0:
        raise ValueError(f"overlay threshold must be positive, got {threshold}")
    ratio = np.asarray(amap, dtype=np.float32) / float(threshold)
    rgba = plt.get_cmap(CMAP)(Normalize(0.0, SCALE_MAX, clip=True)(ratio))
    cut = _clear_ratio(threshold, clear)
    rising = np.clip((ratio - cut) / (1.0 - cut), 0.0, 1.0) if cut < 1.0 else np.zeros_like(ratio)
    rgba[..., 3] = np.where(ratio > 1.0, MAX_ALPHA, NEAR_ALPHA * rising)
    return rgba


def save_overlay(path: str | Path, image: np.ndarray, amap: np.ndarray, threshold: float,
                 gt_mask: np.ndarray | None = None, title: str | None = None, scale_label: str | None = None,
                 aspect: float = 1.0, clear: float | None = None) -> Path:
    """Write the overlay PNG of one image: image [C, H, W] or [H, W(, C)] in [0, 1], amap [H, W] (same
    size), threshold > 0 in map units (the pixel threshold), optional ground truth bool [H, W]; `aspect`
    stretches rows against columns (a squashed S x S input back to its file's proportions: (H/W) / (S/S));
    `clear` the map value below which the overlay is transparent (``clear_level``), marked on the colour bar."""
    shown, amap = _display(image), np.asarray(amap, dtype=np.float32)
    if shown.shape[:2] != amap.shape:
        raise ValueError(f"overlay image {shown.shape[:2]} and map {amap.shape} must have the same size")
    h, w = amap.shape[0] * aspect, amap.shape[1]
    fig, ax = plt.subplots(figsize=(4.0 * w / max(h, w) + 1.3, 4.0 * h / max(h, w) + 0.5))  # long side 4 in
    ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=aspect)
    ax.imshow(overlay_rgba(amap, threshold, clear), interpolation="nearest", aspect=aspect)
    predicted = amap > threshold
    if predicted.any() and not predicted.all():
        ax.contour(predicted.astype(np.float32), levels=[0.5], colors="white", linewidths=1.2)
    if gt_mask is not None and np.any(gt_mask):
        ax.contour(np.asarray(gt_mask, np.float32), levels=[0.5], colors="lime", linewidths=1.2, linestyles="dashed")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    bar = fig.colorbar(plt.cm.ScalarMappable(Normalize(0.0, SCALE_MAX), plt.get_cmap(CMAP)), ax=ax,
                       fraction=0.046, pad=0.03, ticks=[0.0, 0.5, 1.0, 1.5, 2.0])
    bar.ax.set_yticklabels(["0", "0.5", "1 threshold", "1.5", f">= {SCALE_MAX:g}"], fontsize=7)
    bar.ax.axhline(1.0, color="black", linewidth=2)
    bar.ax.axhline(_clear_ratio(threshold, clear), color="white", linewidth=1.5, linestyle="--")
    bar.set_label(scale_label or f"map / threshold ({threshold:.4g})", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_overlay_pages(folder: str | Path, pngs: Sequence[str], captions: Sequence[str],
                        classes: Sequence[str] | None = None, per_page: int = PER_PAGE) -> list[Path]:
    """HTML pages folder/page-001.html ... showing `per_page` overlay PNGs (paths relative to folder) with
    their captions (and optional CSS classes: ok, ng, miss, false-alarm), linked to each other; -> pages."""
    folder = Path(folder)
    n_pages = max(1, math.ceil(len(pngs) / per_page))
    names = [f"page-{k + 1:03d}.html" for k in range(n_pages)]
    legend = ("Heat = anomaly map / pixel threshold (1 = threshold, black on the bar). Transparent below the "
              "clear level (dashed white on the bar: what most good pixels stay under), faint up to the threshold, "
              "strong above it; white outline = predicted region, dashed green = ground truth.")
    pages = []
    for k, name in enumerate(names):
        links = " ".join(f'<a href="{n}">{i + 1}</a>' if i != k else f"<b>{i + 1}</b>" for i, n in enumerate(names))
        cells = "".join(
            f'<figure class="{html.escape(classes[i]) if classes else ""}"><a href="{html.escape(pngs[i])}">'
            f'<img src="{html.escape(pngs[i])}" loading="lazy"></a><figcaption>{html.escape(captions[i])}'
            "</figcaption></figure>" for i in range(k * per_page, min(len(pngs), (k + 1) * per_page)))
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>anoddpm overlays {k + 1}/{n_pages}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top;
border:3px solid transparent}}img{{max-width:340px}}figcaption{{font-size:12px;max-width:340px}}
.miss{{border-color:#d62728}}.false-alarm{{border-color:#ff7f0e}}</style></head><body>
<p><a href="../index.html">report</a> | page {links}</p><p>{legend} Red frame = missed defect,
orange frame = false alarm.</p>
{cells}
<p>page {links}</p></body></html>
""")
        pages.append(path)
    return pages
