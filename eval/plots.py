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


def plot_roc(scores: np.ndarray, labels: np.ndarray, path: str | Path, auroc: float | None = None) -> Path:
    """Image ROC curve of scores [N] vs labels [N] in {0,1} -> PNG at path."""
    labels = np.asarray(labels).reshape(-1)
    _both_classes(labels, "plot_roc")
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores).reshape(-1))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Image ROC", xlim=(0, 1), ylim=(0, 1.02))
    if auroc is not None:
        ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(scores: np.ndarray, labels: np.ndarray, path: str | Path, ap: float | None = None) -> Path:
    """Image precision-recall curve of scores [N] vs labels [N] -> PNG at path."""
    labels = np.asarray(labels).reshape(-1)
    _both_classes(labels, "plot_pr")
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores).reshape(-1))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(recall, precision, label=f"AP {ap:.3f}" if ap is not None else None)
    ax.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", title="Image precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    if ap is not None:
        ax.legend(loc="lower left")
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
              vmax: float | None = None) -> Path:
    """Rows of input | reconstruction | anomaly map | ground-truth overlay -> PNG at path.

    inputs, reconstructions [K,C,H,W] in [0,1]; maps [K,H,W] (shown on one colour scale from 0
    to ``vmax``, default the largest map value); masks [K,H,W] bool filled and outlined on the input.
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
    fig, axes = plt.subplots(k, len(columns), figsize=(2.2 * len(columns), 2.2 * k), squeeze=False)
    for row in range(k):
        panels = {"input": _to_display(inputs[row]), "anomaly map": maps[row]}
        if reconstructions is not None:
            panels["reconstruction"] = _to_display(reconstructions[row])
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_axis_off()
            if name == "anomaly map":
                ax.imshow(panels[name], cmap="inferno", vmin=0.0, vmax=vmax)
            elif name == "ground truth":
                ax.imshow(panels["input"], cmap="gray", vmin=0, vmax=1)
                if masks is not None and np.any(masks[row]):
                    mask = np.asarray(masks[row], dtype=bool)
                    ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
                    ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1)
            else:
                ax.imshow(panels[name], cmap="gray", vmin=0, vmax=1)
            if row == 0:
                ax.set_title(name, fontsize=9)
        if titles is not None:
            axes[row, 0].text(0, -0.02, titles[row], transform=axes[row, 0].transAxes, fontsize=7, va="top")
    return _save(fig, path)
