"""The conditioning of a retrieval-conditioned denoiser's training (``model.condition`` 'retrieval').

The retrieval database is fitted on the training images exactly as calibration fits it
(``anoddpm.detection.retrieval.RetrievalDatabase.fit``), and each training image's neighbours are looked up once,
itself excluded: a training step conditions every image on good images other than itself, as inspection will.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from anoddpm.config import Config
from anoddpm.detection.backbone import build_backbone
from anoddpm.detection.retrieval import RetrievalDatabase


class TrainingRetrieval:
    """The database fitted on the training images and the neighbours [N, k] of each of them."""

    def __init__(self, cfg: Config, images: Sequence[Any], device: torch.device) -> None:
        self.backbone = build_backbone(cfg.backbone).to(device)
        self.database = RetrievalDatabase(cfg).to(device)
        tensors = [torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images]
        embeddings = self.database.fit(tensors, self.backbone, device, cfg.train.batch_size)
        self.table = self.database.neighbour_table(embeddings)

    def of_indices(self, indices: Sequence[int]) -> Tensor:
        """Neighbours [B, k * C, S, S] in [0, 1] of the training images `indices` (never themselves)."""
        return self.database.condition_of(indices, self.table)

    def of_images(self, images: Tensor) -> Tensor:
        """Neighbours [B, k * C, S, S] in [0, 1] of other images [B, C, S, S] in [0, 1] (previews)."""
        with torch.no_grad():
            return self.database(self.backbone(images))
