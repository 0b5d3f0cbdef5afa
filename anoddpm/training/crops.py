"""Random training crops: a crop of each squashed image (``data.train_crop``) or a tile of each native-size image
(``data.tile_size``); offsets are a pure function of (seed, step, rank), so a resumed run sees the same crops."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from eval.tiling import pad_to_tile


def random_crops(images: Tensor, side: int, seed: int, step: int, rank: int) -> Tensor:
    """A random side x side crop of each image [B, C, S, S] (same dtype/device); offsets are a pure function
    of (seed, step, rank), so a resumed run sees the same crops."""
    size = images.shape[-1]
    if side <= 0 or side >= size:
        return images
    offsets = np.random.default_rng([seed, step, rank, 1]).integers(0, size - side + 1, size=(images.shape[0], 2))
    return torch.stack([img[:, y:y + side, x:x + side] for img, (y, x) in zip(images, offsets.tolist())])


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
