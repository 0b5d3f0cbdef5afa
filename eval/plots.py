"""Evaluation plots written as PNG files (matplotlib, Agg backend, no display needed).

Image arrays follow the project convention: float [0, 1], ``[C, H, W]`` with C in {1, 3}.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _both_classes(labels: np.ndarray, what: str) -> None:
    if np.unique(labels).size != 2:
        raise ValueError(f"{what} needs both good (0) and defect (1) labels")


def _image_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false positive rate, recall, precision) of ``score > threshold``; precision 1 when nothing is flagged."""
    flagged = scores > threshold
    tp = float(np.count_nonzero(flagged & (labels == 1)))
    return (float(np.count_nonzero(flagged & (labels == 0)) / max(1, np.count_nonzero(labels == 0))),
            tp / max(1, np.count_nonzero(labels == 1)), tp / flagged.sum() if flagged.any() else 1.0)


def _mark(ax: plt.Axes, x: float, y: float, label: str) -> None:
    ax.plot([x], [y], marker="o", markersize=8, color="tab:red", linestyle="none", label=label, zorder=5)


def plot_roc(scores: np.ndarray, labels: np.ndarray, path: str | Path, auroc: float | None = None,
             threshold: float | None = None) -> Path:
    """Image ROC curve of scores [N] vs labels [N] in {0,1} -> PNG at path; the operating point of ``threshold``
    (``score > threshold``) marked when given."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    _both_classes(labels, "plot_roc")
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}" if auroc is not None else "ROC")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if threshold is not None:
        x, y, _ = _image_point(scores, labels, threshold)
        _mark(ax, x, y, f"threshold {threshold:.4g}: {100 * x:.1f} % good rejected, {100 * (1 - y):.1f} % escapes")
    ax.set(xlabel="false positive rate (good images rejected)", ylabel="true positive rate (defects caught)",
           title="Image ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_pr(scores: np.ndarray, labels: np.ndarray, path: str | Path, ap: float | None = None,
            threshold: float | None = None) -> Path:
    """Image precision-recall curve of scores [N] vs labels [N] -> PNG at path; ``threshold``'s point marked."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    _both_classes(labels, "plot_pr")
    precision, recall, _ = precision_recall_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(recall, precision, label=f"AP {ap:.3f}" if ap is not None else "precision-recall")
    ax.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1)
    if threshold is not None:
        _, r, p = _image_point(scores, labels, threshold)
        _mark(ax, r, p, f"threshold {threshold:.4g}: recall {r:.3f}, precision {p:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Image precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def plot_pixel_roc(fpr: np.ndarray, tpr: np.ndarray, path: str | Path, auroc: float | None = None,
                   point: tuple[float, float] | None = None, threshold: float | None = None) -> Path:
    """Pixel ROC curve (fpr, tpr [K], ``eval.metrics.pixel_roc_curve``) -> PNG at path; ``point`` (fpr, tpr) of
    the pixel threshold marked when given."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}" if auroc is not None else "pixel ROC")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if point is not None:
        _mark(ax, point[0], point[1], f"pixel threshold{'' if threshold is None else f' {threshold:.4g}'}")
    ax.set(xlabel="false positive rate (defect-free pixels)", ylabel="true positive rate (defect pixels)",
           title="Pixel ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_pro(fpr: np.ndarray, pro: np.ndarray, path: str | Path, aupro: float | None = None,
             fpr_limit: float = 0.3, point: tuple[float, float] | None = None, threshold: float | None = None) -> Path:
    """Per-region-overlap curve (fpr, pro [K], ``eval.metrics.pro_curve``) -> PNG at path, the AUPRO range
    [0, fpr_limit] shaded; ``point`` (fpr, pro) of the pixel threshold marked when given."""
    fpr, pro = np.asarray(fpr, np.float64), np.asarray(pro, np.float64)
    if fpr.size > 2000:  # one point per distinct map value: a fixed grid draws the same line
        grid = np.linspace(0.0, 1.0, 2001)
        fpr, pro = grid, np.interp(grid, fpr, pro)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, pro, label=f"AUPRO (FPR <= {fpr_limit:g}) {aupro:.3f}" if aupro is not None else "PRO")
    ax.axvspan(0.0, fpr_limit, color="tab:blue", alpha=0.08)
    if point is not None:
        _mark(ax, point[0], point[1], f"pixel threshold{'' if threshold is None else f' {threshold:.4g}'}")
    ax.set(xlabel="false positive rate (defect-free pixels)", ylabel="per-region overlap",
           title="PRO curve", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None, path: str | Path) -> Path:
    """Histogram of good vs defect scores [N] with the decision threshold -> PNG at path."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.histogram_bin_edges(scores, bins=30)
    for value, name, colour in ((0, "good", "tab:green"), (1, "defect", "tab:red")):
        if np.any(labels == value):
            ax.hist(scores[labels == value], bins=bins, alpha=0.6, color=colour, label=f"{name} ({np.sum(labels == value)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title="Score distribution")
    ax.legend()
    return _save(fig, path)


def _to_display(image: np.ndarray) -> np.ndarray:
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = np.moveaxis(image, 0, -1)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def plot_grid(inputs: np.ndarray, reconstructions: np.ndarray | None, maps: np.ndarray,
              masks: np.ndarray | None, path: str | Path, titles: Sequence[str] | None = None,
              vmax: float | None = None, threshold: float | None = None) -> Path:
    """Rows of input | reconstruction | anomaly map | ground-truth overlay -> PNG at path.

    inputs, reconstructions [K,C,H,W] in [0,1]; maps [K,H,W] (shown on one colour scale from 0
    to ``vmax``, default the largest map value, each with its colour bar, ``threshold`` (map units) marked on it);
    masks [K,H,W] bool filled and outlined on the input.
    Each may also be a sequence of K arrays whose sizes differ from row to row (maps at native resolution).
    """
    inputs = [np.asarray(x) for x in inputs]
    maps = [np.asarray(m) for m in maps]
    if (not inputs or len(inputs) != len(maps) or any(x.ndim != 3 or m.ndim != 2 or x.shape[1:] != m.shape
                                                      for x, m in zip(inputs, maps))):
        raise ValueError(f"plot_grid needs inputs [K,C,H,W] and maps [K,H,W] with K >= 1, "
                         f"got {[x.shape for x in inputs][:2]} and {[m.shape for m in maps][:2]}")
    columns = ["input", "reconstruction", "anomaly map", "ground truth"]
    if reconstructions is None:
        columns.remove("reconstruction")
    k = len(inputs)
    vmax = max(float(m.max()) for m in maps) if vmax is None else vmax
    fig, axes = plt.subplots(k, len(columns), figsize=(2.4 * len(columns), 2.2 * k), squeeze=False)
    for row in range(k):
        panels = {"input": _to_display(inputs[row]), "anomaly map": maps[row]}
        if reconstructions is not None:
            panels["reconstruction"] = _to_display(reconstructions[row])
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_axis_off()
            if name == "anomaly map":
                shown = ax.imshow(panels[name], cmap="inferno", vmin=0.0, vmax=vmax)
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
                bar.ax.tick_params(labelsize=6)
                if threshold is not None and 0.0 < threshold < vmax:
                    bar.ax.axhline(threshold, color="cyan", linewidth=2)
            elif name == "ground truth":
                ax.imshow(panels["input"], cmap="gray", vmin=0, vmax=1)
                if masks is not None and np.any(masks[row]):
                    mask = np.asarray(masks[row], dtype=bool)
                    ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
                    ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1)
            else:
                ax.imshow(panels[name], cmap="gray", vmin=0, vmax=1)
            if row == 0:
                marked = name == "anomaly map" and threshold is not None and 0.0 < threshold < vmax
                ax.set_title(f"{name} (cyan: threshold)" if marked else name, fontsize=9)
        if titles is not None:
            axes[row, 0].text(0, -0.02, titles[row], transform=axes[row, 0].transAxes, fontsize=7, va="top")
    return _save(fig, path)
