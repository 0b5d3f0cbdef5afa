"""Native resolution (``data.tile_size`` T > 0): the model sees T x T tiles of images of any size and aspect.

* Training: each sample is a random T x T crop of a training image rescaled by ``data.tile_scale``
  (``random_tiles``; images smaller than a tile are edge-padded, never enlarged).
* Inspection: ``TiledDetector`` covers an image with the overlapping tile grid of ``eval.tiling``, runs the
  ``Detector`` on the tiles in batches of ``batch_size`` (streamed: one batch of tiles in memory at a time),
  stitches the tiles' anomaly maps (and reconstructions) into maps of the image's own size, averaged where
  tiles overlap, and takes the image score from the stitched map. The Detector does all per-tile work:
  every scoring component and its reference (``detect.map_reference``) acts on each tile, so a component
  added to the Detector works tiled without a change here.
* References are per tile: the nearest_good bank holds tiles of the training images and each tile's
  reference comes from its nearest bank tiles; good_mean is the mean map over training tiles. Both are fitted
  on the training split, so the held-back good images that calibrate the threshold stay out of them.
* ``as_tiles`` turns a set of images into the set of their grid tiles, for what trains or checks on fixed-size
  model inputs (the scoring head, its check, sample grids); without tiling it returns the set unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from anoddpm.config import Config
from anoddpm.scoring_loop import BatchResult, ScoredSet, _timed_inference, score_component_maps, stack_if_same
from eval.tiling import Stitcher, image_score, pad_to_tile, tile_batches, tile_grid

log = logging.getLogger(__name__)


def random_tiles(images: Sequence[Tensor], side: int, seed: int, step: int, rank: int) -> Tensor:
    """One random side x side crop of each image [C, H_i, W_i] -> [B, C, side, side]; offsets are a pure function
    of (seed, step, rank), so a resumed run sees the same crops; sides shorter than `side` are edge-padded."""
    rng = np.random.default_rng([seed, step, rank, 2])
    out = []
    for image in images:
        padded = torch.as_tensor(pad_to_tile(np.asarray(image, dtype=np.float32), side))
        y = int(rng.integers(0, padded.shape[1] - side + 1))
        x = int(rng.integers(0, padded.shape[2] - side + 1))
        out.append(padded[:, y:y + side, x:x + side])
    return torch.stack(out)


class GridTiles(torch.utils.data.Dataset):
    """Every grid tile of a set of images [C, H_i, W_i] as a lazy dataset of float32 tensors [C, T, T]."""

    def __init__(self, images: Sequence[np.ndarray], tile: int, stride: int = 0) -> None:
        self.images, self.tile = images, tile
        self.index = [(i, y, x) for i, image in enumerate(images)
                      for y, x in tile_grid(image.shape[-2], image.shape[-1], tile, stride)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> Tensor:
        i, y, x = self.index[j]
        padded = pad_to_tile(np.asarray(self.images[i], dtype=np.float32), self.tile)
        return torch.from_numpy(np.ascontiguousarray(padded[:, y:y + self.tile, x:x + self.tile]))


def _arrays(dataset: Any) -> Sequence[np.ndarray]:
    """The stored images of an ImageDataset (no augmentation), or the items of any other sequence."""
    return getattr(dataset, "arrays", None) or [dataset[i] for i in range(len(dataset))]


def as_tiles(dataset: Any, cfg: Config) -> Any:
    """`dataset` itself without tiling; else the GridTiles of its images (the inspection grid)."""
    if not cfg.data.tile_size:
        return dataset
    return GridTiles(_arrays(dataset), cfg.data.tile_size, cfg.data.tile_stride)


class TiledDetector:
    """A ``Detector`` applied tile by tile: images float32 [C, H, W] of any size -> maps [H, W] and scores.

    `batch_size` tiles go through the Detector at once; attributes not defined here (cfg, components,
    set_map_reference, ...) are the wrapped Detector's."""

    def __init__(self, detector: torch.nn.Module, batch_size: int = 8) -> None:
        if not detector.cfg.data.tile_size:
            raise ValueError("TiledDetector needs a config with data.tile_size > 0")
        self.detector, self.batch_size = detector, batch_size

    def __getattr__(self, name: str) -> Any:
        if name == "detector":
            raise AttributeError(name)
        return getattr(self.detector, name)

    def score_image(self, image: np.ndarray, device: torch.device,
                    keep_reconstruction: bool = False) -> tuple[np.ndarray, float, np.ndarray | None, float]:
        """image [C, H, W] in [0, 1] -> (stitched anomaly map float32 [H, W], image score, stitched
        reconstruction [C, H, W] or None, seconds of tile inference)."""
        d, det = self.detector.cfg.data, self.detector.cfg.detect
        channels, h, w = image.shape
        maps = Stitcher(1, h, w, d.tile_size)
        rebuilt = Stitcher(channels, h, w, d.tile_size) if keep_reconstruction else None
        seconds = 0.0
        for tiles, offsets in tile_batches(image, d.tile_size, d.tile_stride, self.batch_size):
            (amap, _, reconstruction), took = _timed_inference(self.detector, tiles, device)
            seconds += took
            maps.add(amap.float().cpu().numpy(), offsets)
            if rebuilt is not None:
                rebuilt.add(reconstruction.float().cpu().numpy(), offsets)
        amap = maps.result()[0]
        return amap, image_score(amap, det.score, det.topk), None if rebuilt is None else rebuilt.result(), seconds

    def forward_images(self, images: Sequence[np.ndarray], device: torch.device) -> BatchResult:
        """Score images [C, H_i, W_i] one after the other -> BatchResult with a list of maps [H_i, W_i]
        (reconstructions not kept: None)."""
        results = [self.score_image(np.asarray(image, dtype=np.float32), device) for image in images]
        return BatchResult(maps=[r[0] for r in results], scores=np.array([r[1] for r in results], np.float64),
                           reconstructions=None, seconds=sum(r[3] for r in results))


def fit_tiled_references(tiled: TiledDetector, bank_images: Any, device: torch.device, batch_size: int) -> None:
    """Fit the per-tile reference of ``detect.map_reference`` on the grid tiles of `bank_images` (the training
    split): the nearest_good bank, or the good_mean map over at most BANK_MAX_IMAGES evenly spaced tiles; a
    feature_memory bank from the same tiles first."""
    from anoddpm.evaluate import _fit_feature_memory, _fit_reference_bank, evenly_spaced, set_good_mean_reference
    from eval.threshold import MIN_REFERENCE_IMAGES

    detector, det = tiled.detector, tiled.detector.cfg.detect
    detector.set_map_reference(None)
    detector.set_reference_bank(None)
    tiles = None if bank_images is None else as_tiles(bank_images, detector.cfg)
    if "feature_memory" in detector.components:
        _fit_feature_memory(detector, tiles, device)
    if det.map_reference == "nearest_good":
        _fit_reference_bank(detector, tiles, device, batch_size)
    elif det.map_reference == "good_mean":
        n = 0 if tiles is None else len(tiles)
        if n < MIN_REFERENCE_IMAGES:
            log.warning("map reference: not fitted, %d training tiles are fewer than %d; maps stay unnormalised", n,
                        MIN_REFERENCE_IMAGES)
            return
        chosen = evenly_spaced(n)
        components, _ = score_component_maps(detector, [tiles[int(j)] for j in chosen], device, batch_size,
                                             desc="reference tiles")
        set_good_mean_reference(detector, components)


def score_tiled_set(tiled: TiledDetector, images: Sequence, device: torch.device, keep_maps: bool = True,
                    keep_reconstructions: bool = False, desc: str | None = None) -> ScoredSet:
    """Score images [C, H_i, W_i] tiled -> ScoredSet whose maps / reconstructions are lists when sizes differ."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to score")
    scores, maps, recons, seconds = [], [], [], 0.0
    for i in tqdm(range(n), desc=desc, unit="img", disable=desc is None):
        amap, score, rebuilt, took = tiled.score_image(np.asarray(images[i], dtype=np.float32), device,
                                                       keep_reconstructions)
        scores.append(score)
        seconds += took
        if keep_maps:
            maps.append(amap)
        if keep_reconstructions:
            recons.append(rebuilt.astype(np.float16))
    return ScoredSet(scores=np.array(scores, np.float64), maps=stack_if_same(maps) if keep_maps else None,
                     reconstructions=stack_if_same(recons) if keep_reconstructions else None,
                     seconds_per_image=seconds / n)


def inspection_detector(detector: torch.nn.Module, batch_size: int = 8) -> Any:
    """The Detector itself, or a TiledDetector around it when its config tiles (data.tile_size > 0)."""
    return TiledDetector(detector, batch_size) if detector.cfg.data.tile_size else detector


def resolution(cfg: Config) -> dict[str, Any]:
    """How maps relate to the input files, for reports: squashed to a square, or native scaled and tiled."""
    d = cfg.data
    if not d.tile_size:
        return {"maps": f"{d.image_size}x{d.image_size} (every image {d.resize_policy} to a square)",
                "image_size": d.image_size, "resize_policy": d.resize_policy}
    return {"maps": f"native size x {d.tile_scale:g} (tiles {d.tile_size} px, stride "
                    f"{d.tile_stride or d.tile_size // 2} px)",
            "tile_size": d.tile_size, "tile_scale": d.tile_scale, "tile_stride": d.tile_stride or d.tile_size // 2}

