"""How a Detector meets images: whole (squashed to S x S) or, at native resolution (``data.tile_size`` T > 0), tile by
tile. ``inspection_detector`` gives the view a config asks for; both views offer the same calls (``model_inputs``,
``score_set``, ``forward_images``), so calibration and the verbs never ask which one they hold.

* Training draws random T x T crops (``anoddpm.training.crops``).
* Inspection: ``TiledDetector`` covers an image with the overlapping tile grid of ``eval.tiling``, runs the
  ``Detector`` on the tiles in batches of ``batch_size`` (streamed: one batch of tiles in memory at a time),
  stitches the tiles' anomaly maps (and reconstructions) into maps of the image's own size, averaged where
  tiles overlap, and takes the image score from the stitched map. The Detector does all per-tile work:
  every scoring component and its reference (``detect.map_reference``) acts on each tile, so a component
  added to the Detector works tiled without a change here.
* Fitted states are per tile: ``model_inputs`` gives calibration the grid tiles of a set, so the feature memory, the
  nearest_good bank and the component scales are fitted on tiles; good_mean is the mean map over training tiles
  (a stitched map cannot be scored leave-one-out tile by tile). All are fitted on the training split, so the
  held-back good images that calibrate the threshold stay out of them.
* ``as_tiles`` turns a set of images into the set of their grid tiles, for what trains or checks on fixed-size
  model inputs (the scoring head, its check, sample grids); without tiling it returns the set unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from anoddpm.platform.progress import progress

from anoddpm.config import Config
from anoddpm.data.datasets import stack_if_same
from anoddpm.detection.scoring_loop import BatchResult, ScoredSet, forward_batch, score_images, timed_inference
from eval.tiling import Stitcher, image_score, pad_to_tile, tile_batches, tile_grid

log = logging.getLogger(__name__)


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


class WholeImages:
    """A ``Detector`` on whole images squashed to S x S: images [C, S, S] in batches of `batch_size`."""

    fits_good_mean_on_training = False  # good_mean is fitted on held-back images, scored leave-one-out

    def __init__(self, detector: torch.nn.Module, batch_size: int = 8) -> None:
        self.detector, self.batch_size = detector, batch_size

    @property
    def cfg(self) -> Config:
        """The wrapped Detector's config."""
        return self.detector.cfg

    @property
    def components(self) -> tuple[str, ...]:
        """The wrapped Detector's component names."""
        return self.detector.components

    def model_inputs(self, images: Any) -> Any:
        """What the model sees of a set of images: the images themselves."""
        return images

    def score_set(self, images: Sequence, device: torch.device, keep_maps: bool = True,
                  keep_reconstructions: bool = False, desc: str | None = None) -> ScoredSet:
        """Score images [C, S, S] in batches -> ScoredSet."""
        return score_images(self.detector, images, device, self.batch_size, keep_maps, keep_reconstructions, desc)

    def forward_images(self, images: Sequence[np.ndarray], device: torch.device) -> BatchResult:
        """Images [C, S, S] stacked into one batch -> BatchResult."""
        return forward_batch(self.detector, np.stack(images), device)


class TiledDetector(WholeImages):
    """A ``Detector`` applied tile by tile: images float32 [C, H, W] of any size -> maps [H, W] and scores.

    `batch_size` tiles go through the Detector at once."""

    fits_good_mean_on_training = True  # a stitched map cannot be scored leave-one-out tile by tile

    def __init__(self, detector: torch.nn.Module, batch_size: int = 8) -> None:
        if not detector.cfg.data.tile_size:
            raise ValueError("TiledDetector needs a config with data.tile_size > 0")
        super().__init__(detector, batch_size)

    def model_inputs(self, images: Any) -> Any:
        """What the model sees of a set of images: their grid tiles [C, T, T]."""
        return as_tiles(images, self.cfg)

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
            (amap, _, reconstruction), took = timed_inference(self.detector, tiles, device)
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


    def score_set(self, images: Sequence, device: torch.device, keep_maps: bool = True,
                  keep_reconstructions: bool = False, desc: str | None = None) -> ScoredSet:
        """Score images [C, H_i, W_i] tiled -> ScoredSet whose maps / reconstructions are lists when sizes differ."""
        n = len(images)
        if n == 0:
            raise ValueError("no images to score")
        scores, maps, recons, seconds = [], [], [], 0.0
        for i in progress(range(n), desc=desc, unit="img", disable=desc is None):
            amap, score, rebuilt, took = self.score_image(np.asarray(images[i], dtype=np.float32), device,
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


def inspection_detector(detector: torch.nn.Module, batch_size: int = 8) -> WholeImages:
    """The view a Detector's config asks for: WholeImages, or TiledDetector when it tiles (data.tile_size > 0)."""
    return TiledDetector(detector, batch_size) if detector.cfg.data.tile_size else WholeImages(detector, batch_size)


def resolution(cfg: Config) -> dict[str, Any]:
    """How maps relate to the input files, for reports: squashed to a square, or native scaled and tiled."""
    d = cfg.data
    if not d.tile_size:
        return {"maps": f"{d.image_size}x{d.image_size} (every image {d.resize_policy} to a square)",
                "image_size": d.image_size, "resize_policy": d.resize_policy}
    return {"maps": f"native size x {d.tile_scale:g} (tiles {d.tile_size} px, stride "
                    f"{d.tile_stride or d.tile_size // 2} px)",
            "tile_size": d.tile_size, "tile_scale": d.tile_scale, "tile_stride": d.tile_stride or d.tile_size // 2}

