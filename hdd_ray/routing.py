"""The training-free centroid router (``sampling.router=centroid``; c-BTM's rule).

When the clusters were embedded by an open_clip image tower (``clustering.embedder=open_clip``),
a prompt embedded by the same model's text tower lives in the space of the cluster centroids
(``clusters/centroids.npy``): its routing weights are ``softmax(-|e(prompt) - c_k|^2 / T)``
over the K centroids, with ``T`` = ``sampling.centroid_temperature``. Nothing is trained, and
adding an expert is adding its centroid (``hdd_ray.prepare.grow``). It routes on the prompt
alone, the same weights at every ``(x_t, t)``; the learned router (``hdd_ray.models.router``)
routes on ``(x_t, t)`` and never sees the prompt.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hdd_ray.errors import MixtureError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

__all__ = ["CentroidRouter", "centroid_weights", "load_centroid_router"]


def centroid_weights(text: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """Routing weights ``[N, K]``: ``softmax(-|text_n - c_k|^2 / temperature)`` over k, for
    prompt embeddings ``text [N, D]`` and centroids ``[K, D]`` (float64 inside)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    t, c = text.double(), centroids.double()
    d2 = (t * t).sum(1, keepdim=True) - 2 * t @ c.T + (c * c).sum(1)[None]
    return torch.softmax(-d2.clamp_min(0) / temperature, dim=1).to(text.dtype)


class CentroidRouter:
    """Routing weights of prompts from their text embedding and the cluster centroids.

    ``encode(prompts) -> [N, D]`` embeds prompts (unit length, as the image tower's features
    were when the clusters were made); :meth:`weights` gives ``[N, K]``."""

    def __init__(self, encode: Callable[[list[str]], Tensor], centroids: Tensor,
                 temperature: float) -> None:
        self.encode, self.centroids, self.temperature = encode, centroids.float(), temperature

    @property
    def num_experts(self) -> int:
        """K: one output per centroid."""
        return int(self.centroids.shape[0])

    def weights(self, prompts: Sequence[str]) -> Tensor:
        """``[N, K]`` routing weights of ``prompts`` (CPU, float32)."""
        with torch.no_grad():
            text = self.encode(list(prompts)).float().cpu()
        return centroid_weights(text, self.centroids, self.temperature)


def load_centroid_router(cfg: CampaignConfig, manifest: dict[str, Any]) -> CentroidRouter:
    """The campaign's centroid router: the first K rows of ``centroids.npy`` (the cluster set
    of ``manifest``, a generation's view) and the text tower of the open_clip model that
    embedded the clusters. Refused in one line unless that embedder was an open_clip image
    tower."""
    from hdd_ray import storage, towers
    from hdd_ray.campaign import CampaignPaths

    emb = manifest.get("embedder") or {}
    if emb.get("name") != "open_clip":
        raise MixtureError(
            f"sampling.router=centroid needs clusters embedded by a CLIP image tower "
            f"(clustering.embedder=open_clip); this campaign's were embedded by "
            f"{emb.get('name')!r}, which has no text tower: use sampling.router=learned")
    path = storage.join(CampaignPaths(cfg.root).clusters, "centroids.npy")
    centroids = np.load(io.BytesIO(storage.read_bytes(path)))[: int(manifest["k"])]
    model = towers.open_clip_model(str(emb["arch"]), emb.get("weights"),
                                   arch_key="clustering.embedder_arch",
                                   weights_key="clustering.embedder_weights")
    model = model.eval().requires_grad_(False)
    tokenizer = towers.open_clip_tokenizer(str(emb["arch"]), "clustering.embedder_arch")

    def encode(prompts: list[str]) -> Tensor:
        return torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)).float(),
                                             dim=-1)

    return CentroidRouter(encode, torch.from_numpy(centroids),
                          float(cfg.sampling.centroid_temperature))
