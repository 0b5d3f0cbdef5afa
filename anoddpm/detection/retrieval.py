"""Retrieval-augmented reconstruction (RDM, Blattmann et al. 2022): the denoiser sees the good images nearest its input.

The retrieval database is a fitted state like the feature memory: up to ``model.retrieval_images`` good training
images (evenly spaced beyond that), each with the unit-length global embedding of the frozen backbone
(``global_embedding``: every stage's features averaged over locations, concatenated). For an input image the
``model.retrieval_neighbours`` entries nearest in that embedding become the conditioning of the UNet (extra input
channels, nearest first). An entry whose embedding coincides with the query's (squared distance under
SELF_DISTANCE) is the query itself and is never retrieved: a training image is not its own neighbour, in training
and when calibration reconstructs the training split. Fitting needs no training, so ``anoddpm calibrate --data``
swaps the database for other good images of the product. Everything in ``forward`` traces to ONNX (a TopK and a
Gather over the stored embeddings and images).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.config import Config
from anoddpm.detection.scoring_loop import batched
from anoddpm.platform.progress import progress

SELF_DISTANCE = 1e-5  # squared distance of unit embeddings under which an entry is the query itself (never retrieved)
EXCLUDED = 8.0  # added to an excluded entry's squared distance (unit embeddings are at most 4 apart)


def global_embedding(features: list[Tensor]) -> Tensor:
    """Stage feature maps [B, C_i, h_i, w_i] -> unit-length global embedding [B, sum C_i] (location means, joined)."""
    return F.normalize(torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1), dim=1)


def nearest_entries(queries: Tensor, keys: Tensor, k: int) -> Tensor:
    """Unit embeddings queries [B, D] and keys [N, D] -> indices [B, k] of the k nearest keys, nearest first, an
    entry at the query's own place (squared distance < SELF_DISTANCE) excluded."""
    squared = (2.0 - 2.0 * queries @ keys.T).clamp(min=0.0)
    squared = squared + (squared < SELF_DISTANCE).to(squared.dtype) * EXCLUDED
    return torch.topk(squared, k, dim=1, largest=False).indices


class RetrievalDatabase(nn.Module):
    """The good images a conditioned denoiser retrieves from: forward(backbone features of a batch) -> the
    neighbours [B, k * C, S, S] in [0, 1]; fitted by ``fit`` (calibration), stored in the bundle as ``retrieval``."""

    embeddings: Tensor
    images: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.k, self.max_images = cfg.model.retrieval_neighbours, cfg.model.retrieval_images
        self.channels, self.side = cfg.data.channels, cfg.data.input_side
        self.width = cfg.backbone.feature_channels
        self.register_buffer("embeddings", torch.zeros(0, self.width), persistent=False)
        self.register_buffer("images", torch.zeros(0, self.channels, self.side, self.side, dtype=torch.uint8),
                             persistent=False)

    @property
    def fitted(self) -> bool:
        """True once the database holds images."""
        return self.images.shape[0] > 0

    def reset(self) -> None:
        """Forget the database."""
        self.load_fitted_state({"embeddings": self.embeddings[:0], "images": self.images[:0]})

    def forward(self, features: list[Tensor]) -> Tensor:
        """Backbone stage features of images [B, ...] -> their k nearest database images [B, k * C, S, S] in [0, 1]."""
        if not self.fitted:
            raise ValueError("model.condition 'retrieval': the retrieval database is not fitted; calibrate the model "
                             "(anoddpm calibrate --model M) before reconstructing")
        return self._images_of(nearest_entries(global_embedding(features), self.embeddings, self.k))

    def fit(self, images: Sequence[Tensor], backbone: nn.Module, device: torch.device, batch_size: int) -> Tensor:
        """Fill the database from good images [C, S, S] in [0, 1] (at most max_images, evenly spaced) ->
        the embeddings [N, D] of all `images` (what training looks neighbours up with); ValueError when there
        are fewer than k + 1 images."""
        if len(images) < self.k + 1:
            raise ValueError(f"model.condition 'retrieval' needs at least model.retrieval_neighbours + 1 = "
                             f"{self.k + 1} good images for its database; got {len(images)}")
        embeddings = embed_images(images, backbone, device, batch_size)
        kept = np.unique(np.linspace(0, len(images) - 1, min(len(images), self.max_images)).round().astype(int))
        stacked = torch.stack([torch.as_tensor(images[int(i)]) for i in kept])
        self.load_fitted_state({"embeddings": embeddings[kept],
                                "images": (stacked.clamp(0, 1) * 255).round().to(torch.uint8)})
        return embeddings

    def fitted_state(self) -> dict[str, Tensor] | None:
        """{"embeddings" [N, D] float32, "images" [N, C, S, S] uint8} on the CPU; None when not fitted."""
        if not self.fitted:
            return None
        return {"embeddings": self.embeddings.detach().cpu().float(), "images": self.images.detach().cpu()}

    def load_fitted_state(self, state: Mapping[str, Tensor]) -> None:
        """Use a stored database (``fitted_state``)."""
        device = self.embeddings.device
        self.embeddings = state["embeddings"].to(device, torch.float32)
        self.images = state["images"].to(device, torch.uint8)

    def condition_of(self, indices: Any, table: Tensor) -> Tensor:
        """Training: the neighbours [B, k * C, S, S] in [0, 1] of training images `indices` given their
        ``neighbour_table`` rows."""
        return self._images_of(table[torch.as_tensor(indices, dtype=torch.long)].to(self.images.device))

    def _images_of(self, index: Tensor) -> Tensor:
        """Database indices [B, k] -> those images side by side [B, k * C, S, S] in [0, 1]."""
        neighbours = self.images[index.reshape(-1)].to(self.embeddings.dtype) / 255.0
        return neighbours.reshape(index.shape[0], self.k * self.channels, self.side, self.side)

    def neighbour_table(self, embeddings: Tensor) -> Tensor:
        """Embeddings [N, D] of the training images -> database indices [N, k] of each one's neighbours (itself
        excluded), on the CPU."""
        keys = self.embeddings.cpu()
        return torch.cat([nearest_entries(chunk, keys, self.k) for chunk in embeddings.cpu().split(1024)])


def embed_images(images: Sequence[Tensor], backbone: nn.Module, device: torch.device, batch_size: int) -> Tensor:
    """Global embeddings [N, D] (CPU) of images [C, S, S] in [0, 1] by the frozen backbone."""
    out = []
    bar = progress(total=len(images), desc="retrieval database", unit="image", leave=False)
    with torch.no_grad():
        for chunk in batched((images[i] for i in range(len(images))), batch_size):
            batch = torch.stack([torch.as_tensor(image) for image in chunk]).to(device)
            out.append(global_embedding(backbone(batch)).cpu())
            bar.update(len(chunk))
    bar.close()
    return torch.cat(out)
