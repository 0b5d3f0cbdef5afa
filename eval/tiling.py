"""Tiling at native resolution: cover an image of any size with overlapping T x T tiles, stitch tile maps back.

numpy only: the PyTorch path (``anoddpm.detection.tiling``) and the torch-free line runtime (``deploy.runtime``) cut the
same tiles and average the same overlaps from this one module.

* Grid: along each axis tiles start every ``stride`` pixels and the last one is shifted inward so it ends at
  the border (no tile hangs over the edge); a side no longer than the tile gets a single tile.
* A side shorter than the tile is padded at its end (bottom / right) by edge replication, never enlarged;
  stitched maps are cropped back to the image size.
* Stitching: each pixel gets the mean of the values of every tile covering it.
* Memory: ``tile_batches`` yields at most ``batch_size`` tiles at a time, so a 20-megapixel frame never holds
  more than one batch of tiles next to the image and its stitched maps.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

SCORE_REDUCTIONS = ("max", "topk")


def resolve_stride(tile: int, stride: int) -> int:
    """The grid step in pixels: `stride`, or tile // 2 when stride is 0."""
    if tile < 1 or not 0 <= stride <= tile:
        raise ValueError(f"tile stride {stride} must be in 0..tile size {tile} (0 = half a tile)")
    return stride or max(1, tile // 2)


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile start offsets along one axis of `length` pixels; the last tile ends at the border."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, stride: int = 0) -> list[tuple[int, int]]:
    """(top, left) of every tile covering a height x width image, row-major (stride 0 = tile // 2)."""
    step = resolve_stride(tile, stride)
    return [(y, x) for y in axis_starts(height, tile, step) for x in axis_starts(width, tile, step)]


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """[C, H, W] -> [C, max(H, T), max(W, T)], the short sides edge-padded at their end (no copy when big enough)."""
    _, h, w = image.shape
    if h >= tile and w >= tile:
        return image
    return np.pad(image, ((0, 0), (0, max(0, tile - h)), (0, max(0, tile - w))), mode="edge")


def tile_batches(image: np.ndarray, tile: int, stride: int = 0,
                 batch_size: int = 8) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """image [C, H, W] -> successive (tiles float32 [n <= batch_size, C, T, T], their (top, left) offsets)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    padded = pad_to_tile(np.asarray(image, dtype=np.float32), tile)
    offsets = tile_grid(image.shape[1], image.shape[2], tile, stride)
    for start in range(0, len(offsets), batch_size):
        chunk = offsets[start:start + batch_size]
        yield np.stack([padded[:, y:y + tile, x:x + tile] for y, x in chunk]), chunk


class Stitcher:
    """Accumulates tile maps [n, K, T, T] at their offsets into K maps of the image size, averaged on overlaps."""

    def __init__(self, channels: int, height: int, width: int, tile: int) -> None:
        self.height, self.width, self.tile = height, width, tile
        shape = (max(height, tile), max(width, tile))
        # float32: a 20-megapixel frame's sums and counts take 160 MB (exact counts up to 2**24 tiles per pixel)
        self.total = np.zeros((channels, *shape), dtype=np.float32)
        self.count = np.zeros(shape, dtype=np.float32)

    def add(self, maps: np.ndarray, offsets: list[tuple[int, int]]) -> None:
        """Add tile maps [n, K, T, T] whose tiles start at `offsets` [(top, left)] * n."""
        t = self.tile
        for amap, (y, x) in zip(maps, offsets):
            self.total[:, y:y + t, x:x + t] += amap
            self.count[y:y + t, x:x + t] += 1.0

    def result(self) -> np.ndarray:
        """The stitched maps float32 [K, H, W]; every pixel is covered by at least one tile."""
        assert self.count[:self.height, :self.width].min() > 0, "stitched before every tile was added"
        return self.total[:, :self.height, :self.width] / self.count[:self.height, :self.width]


def image_score(amap: np.ndarray, reduction: str = "max", topk: int = 100) -> float:
    """Image score of one stitched anomaly map [H, W]: its max, or the mean of its top-k pixels
    (the numpy twin of ``anoddpm.detection.maps.image_score``)."""
    flat = np.asarray(amap, dtype=np.float32).reshape(-1)
    if reduction == "max":
        return float(flat.max())
    if reduction == "topk":
        if topk < 1:
            raise ValueError(f"detect.topk={topk} must be at least 1")
        k = min(topk, flat.size)
        return float(np.partition(flat, flat.size - k)[flat.size - k:].mean(dtype=np.float32))
    raise ValueError(f"detect.score={reduction!r} is not allowed; choose one of {', '.join(SCORE_REDUCTIONS)}")
