"""Embedders of the prepare stage: what k-means compares samples by.

``pixels`` (the demo's: downsampled pixels), ``dinov2`` (a timm DINOv2 ViT) or ``open_clip``
(the image tower of a CLIP). The pretrained ones are loaded by :mod:`hdd_ray.towers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hdd_ray import towers
from hdd_ray.corpus import prepare_image
from hdd_ray.errors import PrepareError

if TYPE_CHECKING:
    from hdd_ray.config import ClusteringConfig

__all__ = ["PixelEmbedder", "build_embedder", "check_embedder"]

_ARCH_KEY = "clustering.embedder_arch"
_WEIGHTS_KEY = "clustering.embedder_weights"


class PixelEmbedder:
    """Pixels downsampled to ``pixel_size``² (bicubic), flattened, scaled to [0, 1].

    The demo's embedder: on 8x8 digit scans it is the raw image, which k-means separates well.
    """

    normalize = False

    def __init__(self, pixel_size: int, channels: int) -> None:
        self.pixel_size, self.channels = pixel_size, channels
        self.dim = pixel_size * pixel_size * channels

    def preprocess(self, img: Any) -> np.ndarray:
        """PIL image -> flat float32 vector."""
        arr = prepare_image(img, self.channels, self.pixel_size)
        return arr.reshape(-1).astype(np.float32) / 255.0

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Stacked preprocessed images -> ``[B, dim]``."""
        return x


class _TorchEmbedder:
    """Shared part of the feature embedders: a torch image model + its eval transform."""

    normalize = True  # features are compared by angle: unit length, then L2 k-means

    def __init__(self, model: Any, transform: Any, dim: int, device: str) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.transform, self.dim, self.device = transform, dim, device

    def preprocess(self, img: Any) -> np.ndarray:
        """PIL image -> normalised float32 ``[3, S, S]`` (the model's own transform)."""
        return self.transform(img.convert("RGB")).numpy()

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Stacked preprocessed images -> unit-length ``[B, dim]`` float32 features."""
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(x).to(self.device)
            if self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats = self.model(batch)
            else:
                feats = self.model(batch)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)


def _towers_errors(build: Any) -> Any:
    """Run ``build()``; the towers' one-line errors become :class:`PrepareError`."""
    try:
        return build()
    except (FileNotFoundError, ValueError) as exc:
        raise PrepareError(str(exc)) from None


def _dinov2(arch: str, weights: str, image_size: int | None, device: str) -> _TorchEmbedder:
    from timm.data import create_transform, resolve_model_data_config

    model = _towers_errors(lambda: towers.dinov2_model(
        arch, weights, img_size=image_size, arch_key=_ARCH_KEY, weights_key=_WEIGHTS_KEY
    ))
    data_cfg = resolve_model_data_config(model)
    size = image_size or model.patch_embed.img_size[0]
    data_cfg["input_size"] = (3, size, size)
    return _TorchEmbedder(model, create_transform(**data_cfg), model.num_features, device)


def _open_clip(arch: str, weights: str, image_size: int | None, device: str) -> _TorchEmbedder:
    kwargs = {"force_image_size": image_size} if image_size else {}
    model = _towers_errors(lambda: towers.open_clip_model(
        arch, weights, arch_key=_ARCH_KEY, weights_key=_WEIGHTS_KEY, **kwargs
    ))
    visual = model.visual  # the image tower is all the clustering needs
    transform = towers.open_clip_image_transform(model)
    return _TorchEmbedder(visual, transform, int(visual.output_dim), device)


def build_embedder(
    name: str,
    channels: int,
    pixel_size: int = 8,
    arch: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    device: str = "cpu",
) -> Any:
    """An embedder with ``dim``, ``normalize``, ``preprocess(pil) -> array``, ``embed(stack)``.

    ``pixels`` (downsample + flatten), ``dinov2`` (a timm DINOv2 ViT ``arch`` with weights
    from the local file ``weights``) or ``open_clip`` (image tower of ``arch``, a name or a
    config ``.json``; ``weights`` a local file or an open_clip pretrained tag).
    """
    if name == "pixels":
        return PixelEmbedder(pixel_size, channels)
    if name == "dinov2":
        return _dinov2(str(arch), str(weights), image_size, device)
    if name == "open_clip":
        return _open_clip(str(arch), str(weights), image_size, device)
    raise PrepareError(f"clustering.embedder={name!r}: unknown embedder")


def check_embedder(cl: ClusteringConfig) -> None:
    """Fail fast (before Ray starts) on a missing weights file or unknown architecture."""
    if cl.embedder == "pixels":
        return
    if not cl.embedder_weights:
        what = "a local weights file" + (" or pretrained tag" if cl.embedder == "open_clip" else "")
        raise PrepareError(
            f"clustering.embedder_weights=None: required for clustering.embedder="
            f"{cl.embedder!r} ({what})"
        )
    arch, weights = str(cl.embedder_arch), str(cl.embedder_weights)
    if cl.embedder == "dinov2":
        _towers_errors(lambda: towers.resolve_dinov2(arch, weights, _ARCH_KEY, _WEIGHTS_KEY))
    else:
        _towers_errors(lambda: towers.resolve_open_clip(arch, weights, _ARCH_KEY, _WEIGHTS_KEY))
