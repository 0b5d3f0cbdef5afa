"""The batched scoring loops of a Detector on whole model inputs, shared by calibration, the verbs and the head check.

One place moves batches to the device, runs the detector under ``torch.inference_mode``, times
the forward pass (synchronising CUDA so the clock measures the work, not the launch) and
brings back one result per batch to the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from anoddpm.platform.progress import progress


@dataclass
class BatchResult:
    """Host copies of one forward pass: maps [B, S, S] float32, scores [B] float64, reconstructions
    [B, C, S, S] float32 in [0, 1], seconds of wall time (tiled: maps a list of [H_i, W_i], no reconstructions)."""

    maps: np.ndarray | list[np.ndarray]
    scores: np.ndarray
    reconstructions: np.ndarray | None
    seconds: float


@dataclass
class ScoredSet:
    """Scores [N], maps [N, S, S] float32, reconstructions [N, C, S, S] float16 (None if not kept) and
    mean forward seconds per image; tiled (anoddpm.detection.tiling), maps and reconstructions are lists of [H_i, W_i]
    and [C, H_i, W_i], the images' own sizes."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray] | None
    reconstructions: np.ndarray | list[np.ndarray] | None
    seconds_per_image: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_inference(fn: Callable[[torch.Tensor], Any], images: torch.Tensor | np.ndarray,
                     device: torch.device) -> tuple[Any, float]:
    """fn(images [B, C, S, S] as float32 on device) under inference_mode, and the seconds of transfer + work."""
    batch = torch.as_tensor(images, dtype=torch.float32)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn(batch.to(device, non_blocking=True))
        _sync(device)
    return out, time.perf_counter() - start


def forward_batch(detector: torch.nn.Module, images: torch.Tensor | np.ndarray,
                  device: torch.device) -> BatchResult:
    """Run the detector on images [B, C, S, S] in [0, 1]; the timing covers transfer + forward."""
    (amap, score, recon), seconds = timed_inference(detector, images, device)
    return BatchResult(maps=amap[:, 0].float().cpu().numpy(), scores=score.double().cpu().numpy(),
                       reconstructions=recon.float().cpu().numpy(), seconds=seconds)


def batched(items: Iterable, batch_size: int) -> Iterator[list]:
    """Group an iterable into lists of at most batch_size items."""
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be at least 1")
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_images(detector: torch.nn.Module, images: Sequence, device: torch.device, batch_size: int = 8,
                 keep_maps: bool = True, keep_reconstructions: bool = False, desc: str | None = None) -> ScoredSet:
    """Score a sequence of [C, S, S] images (tensors or arrays in [0, 1]) in batches, with progress (``anoddpm.platform.progress``).

    Reconstructions are kept as float16 (only for report figures) to halve their memory. Images of any size go
    tile by tile through ``anoddpm.detection.tiling.TiledDetector.score_set``.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images to score")
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    recons: list[np.ndarray] = []
    seconds = 0.0
    with progress(total=n, desc=desc, unit="img", disable=desc is None) as bar:
        for chunk in batched((images[i] for i in range(n)), batch_size):
            result = forward_batch(detector, torch.stack([torch.as_tensor(x) for x in chunk]), device)
            scores.append(result.scores)
            if keep_maps:
                maps.append(result.maps)
            if keep_reconstructions:
                recons.append(result.reconstructions.astype(np.float16))
            seconds += result.seconds
            bar.update(len(chunk))
    return ScoredSet(scores=np.concatenate(scores), maps=np.concatenate(maps) if keep_maps else None,
                     reconstructions=np.concatenate(recons) if keep_reconstructions else None,
                     seconds_per_image=seconds / n)


def score_component_maps(detector: torch.nn.Module, images: Sequence, device: torch.device, batch_size: int = 8,
                         desc: str | None = None,
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         referenced: bool = False) -> tuple[np.ndarray, float]:
    """Each component map of a ``Detector`` (``detector.component_maps``, before any reference; with
    `referenced`, ``detector.referenced_components``, each over its fitted reference) for a sequence of
    [C, S, S] images in [0, 1]: ([N, K, S, S] float32, mean forward seconds per image).

    ``reduce`` maps each batch's [B, K, S, S] maps (on the host) to what is kept, e.g. pooled maps, so that
    full-resolution maps of a large set are never all in memory at once."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to score")
    maps: list[np.ndarray] = []
    seconds = 0.0
    with progress(total=n, desc=desc, unit="img", disable=desc is None) as bar:
        for chunk in batched((images[i] for i in range(n)), batch_size):
            (components, _), chunk_seconds = timed_inference(
                detector.referenced_components if referenced else detector.component_maps, torch.stack([torch.as_tensor(x) for x in chunk]), device)
            components = components.float().cpu()
            maps.append((components if reduce is None else reduce(components)).numpy())
            seconds += chunk_seconds
            bar.update(len(chunk))
    return np.concatenate(maps), seconds / n
