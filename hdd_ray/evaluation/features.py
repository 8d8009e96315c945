"""Feature extractors for FID-style metrics: images in [-1, 1] in, one feature vector per image out.

Every extractor is an ``nn.Module`` mapping ``[N, C, H, W]`` images in [-1, 1] (``C`` 1 or 3, any
size) to ``[N, D]`` float32 features, with ``num_features`` (``D``) and ``name`` attributes. It
converts grayscale to RGB, resizes and normalizes the way its backbone was trained, and stays in
eval mode with frozen weights. ``name`` identifies the backbone *and its weights*, because cached
reference statistics are keyed by it.

* ``inception``: torchmetrics' FID Inception-v3 (torch-fidelity's port of the TF graph that
  defines FID), 2048-d pool features; weights from a local file.
* ``clip``: an open_clip image tower (CLIP-FID, Kynkaanniemi et al. 2023), image embeddings
  before normalization; weights from an open_clip tag or a local file, or a given CLIP model
  (the demo's reference CLIP).
* ``dinov2``: a timm DINOv2 ViT (FD-DINOv2, Stein et al. 2023), CLS features at 224 px; weights
  from a local file.

Pretrained backbones are loaded by :mod:`hdd_ray.towers` (its local-file rules, QuickGELU for
OpenAI weights). No extractor downloads anything by itself; the only network access is open_clip
fetching a named pretrained tag, which is the user's explicit choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdd_ray import towers
from hdd_ray.choices import EXTRACTOR_KINDS

__all__ = [
    "DEFAULT_CLIP_ARCH",
    "DEFAULT_DINOV2_ARCH",
    "EXTRACTOR_KINDS",
    "FeatureExtractor",
    "OpenCLIPImageExtractor",
    "DINOv2Extractor",
    "InceptionExtractor",
    "build_extractor",
    "clip_pixels",
    "extract_features",
    "to_rgb",
]

DEFAULT_CLIP_ARCH = "ViT-B-32"  # CLIP-FID's tower (Kynkaanniemi et al., "The Role of ImageNet Classes in FID")
DEFAULT_DINOV2_ARCH = "vit_large_patch14_dinov2"  # FD-DINOv2's ViT-L/14 (Stein et al. 2023)
_WEIGHTS_KEY = "evaluation.extractor_weights"
_ARCH_KEY = "evaluation.extractor_arch"
_KIND_KEY = "evaluation.fid_extractor"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(images: Tensor) -> Tensor:
    """``[N, 1 | 3, H, W]`` -> ``[N, 3, H, W]`` (grayscale repeated over the three channels)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images [N, C, H, W] with C in (1, 3), got shape {tuple(images.shape)}"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize with antialiasing (what PIL-based preprocessing does), no-op at size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def _normalize(x01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def clip_pixels(images: Tensor, model: nn.Module) -> Tensor:
    """Images in [-1, 1] -> the pixels ``model`` (an open_clip CLIP) expects.

    RGB, resized (bicubic) to the tower's ``image_size``, scaled to [0, 1] and normalized with
    the model's preprocessing mean/std (open_clip's ``preprocess_cfg``; OpenAI's values when the
    model has none). One function for FID features, CLIP score and the reference CLIP's training,
    so the three always see identical pixels.
    """
    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = _pair(cfg.get("size", getattr(visual, "image_size", 224)))
    mean = cfg.get("mean", getattr(visual, "image_mean", None) or _OPENAI_MEAN)
    std = cfg.get("std", getattr(visual, "image_std", None) or _OPENAI_STD)
    x01 = ((to_rgb(images.float()) + 1.0) / 2.0).clamp(0.0, 1.0)
    return _normalize(_resize(x01, size).clamp(0.0, 1.0), mean, std)


class FeatureExtractor(nn.Module):
    """Base class: frozen, always in eval mode, ``[N, C, H, W]`` in [-1, 1] -> ``[N, D]``."""

    name: str
    num_features: int

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: features must not depend on the caller's train/eval switches."""
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


class OpenCLIPImageExtractor(FeatureExtractor):
    """An open_clip image tower: features are ``encode_image`` embeddings, unnormalized.

    The extractor shares ``model.visual`` (no copy), and freezes it and puts it in eval mode.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.visual = model.visual
        self.name = name
        dim = getattr(self.visual, "output_dim", None)
        if not isinstance(dim, int):  # towers without output_dim: measure it once
            with torch.no_grad():
                dim = int(self.visual(clip_pixels(torch.zeros(1, 3, 8, 8), model)).shape[-1])
        self.num_features = int(dim)
        self._freeze()

    def forward(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> ``[N, embed_dim]``."""
        return self.visual(clip_pixels(images, self)).float()


class DINOv2Extractor(FeatureExtractor):
    """A timm DINOv2 ViT without head: CLS-token features at ``image_size`` (224 for FD-DINOv2)."""

    def __init__(self, model: nn.Module, name: str, image_size: int = 224) -> None:
        super().__init__()
        from timm.data import resolve_model_data_config

        self.model = model
        self.name = name
        self.image_size = image_size
        data_cfg = resolve_model_data_config(model)
        self.mean = tuple(data_cfg.get("mean", _IMAGENET_MEAN))
        self.std = tuple(data_cfg.get("std", _IMAGENET_STD))
        self.num_features = int(model.num_features)
        self._freeze()

    def forward(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> ``[N, width]``."""
        x01 = ((to_rgb(images.float()) + 1.0) / 2.0).clamp(0.0, 1.0)
        x01 = _resize(x01, (self.image_size, self.image_size)).clamp(0.0, 1.0)
        return self.model(_normalize(x01, self.mean, self.std)).float()


class InceptionExtractor(FeatureExtractor):
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d pool3), fed uint8 RGB as FID defines it.

    The network resizes to 299 px itself (TF1-compatible bilinear), so images of any size go in.
    """

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
        )
        self.name = "inception"
        self.num_features = 2048
        self._freeze()

    def forward(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> ``[N, 2048]``."""
        x = ((to_rgb(images.float()) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.inception(x).float()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features of ``images`` in batches (bounded memory for large sets) -> ``[N, D]`` float32."""
    device = next(extractor.parameters(), torch.zeros(0)).device
    chunks = [
        extractor(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, int(extractor.num_features))


def _fingerprint(module: nn.Module) -> str:
    """First 8 hex digits of sha256 over a module's state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def build_extractor(
    kind: str,
    weights: str | None = None,
    arch: str | None = None,
    clip_model: nn.Module | None = None,
    name: str | None = None,
) -> FeatureExtractor:
    """Build a frozen feature extractor for FID (``kind`` in ``clip | inception | dinov2``).

    * ``inception``: ``weights`` is the local FID Inception file (torch-fidelity's
      ``pt_inception-2015-12-05-6726825d.pth``); required.
    * ``clip``: ``clip_model`` (any open_clip CLIP, e.g. the demo's reference CLIP), or
      ``arch`` (default ``ViT-B-32``; a name or a config ``.json``) with ``weights`` an open_clip
      pretrained tag (``"openai"``, fetched by open_clip into its cache) or a local file.
    * ``dinov2``: timm ``arch`` (default ``vit_large_patch14_dinov2``) with ``weights`` a local
      file (the official ``dinov2_vitl14_pretrain.pth`` or a timm state dict; timm converts).

    ``name`` overrides the extractor's name (the reference-statistics cache key); by default it
    names the backbone and its weights (tag, file stem, or a fingerprint of a given model).
    Missing weights fail with one line naming ``evaluation.extractor_weights``.
    """
    if kind == "inception":
        extractor: FeatureExtractor = InceptionExtractor(
            towers.local_file(weights, _WEIGHTS_KEY, f"{_KIND_KEY}={kind!r}")
        )
    elif kind == "clip":
        extractor = _build_clip(weights, arch, clip_model)
    elif kind == "dinov2":
        extractor = _build_dinov2(weights, arch)
    else:
        raise ValueError(
            f"evaluation.fid_extractor={kind!r}: expected one of {', '.join(EXTRACTOR_KINDS)}"
        )
    if name is not None:
        extractor.name = name
    return extractor


def _build_clip(
    weights: str | None, arch: str | None, clip_model: nn.Module | None
) -> FeatureExtractor:
    if clip_model is not None:
        label = getattr(clip_model, "eval_label", "model")
        return OpenCLIPImageExtractor(clip_model, f"clip:{label}-{_fingerprint(clip_model)}")
    arch_name = towers.open_clip_arch(arch or DEFAULT_CLIP_ARCH, _ARCH_KEY)
    if not weights:
        raise ValueError(
            f"{_WEIGHTS_KEY} is required for fid_extractor=clip: an open_clip pretrained tag "
            f"(e.g. 'openai' for {DEFAULT_CLIP_ARCH}) or a local weights file"
        )
    model = towers.open_clip_model(arch_name, weights, arch_key=_ARCH_KEY,
                                   weights_key=_WEIGHTS_KEY)
    label = Path(weights).stem if towers.is_local_path(weights) else weights
    return OpenCLIPImageExtractor(model, f"clip:{arch_name}:{label}")


def _build_dinov2(weights: str | None, arch: str | None) -> FeatureExtractor:
    import timm

    arch = arch or DEFAULT_DINOV2_ARCH
    path = towers.local_file(weights, _WEIGHTS_KEY, f"{_KIND_KEY}='dinov2'")
    if arch not in timm.list_models("*dinov2*"):
        raise ValueError(f"unknown timm DINOv2 architecture {arch!r} (see timm.list_models)")
    # 224 px: FD-DINOv2's resolution (timm resamples the 518 px position embedding).
    model = towers.dinov2_model(arch, path, img_size=224, arch_key=_ARCH_KEY,
                                weights_key=_WEIGHTS_KEY)
    return DINOv2Extractor(model, f"dinov2:{arch}:{Path(path).stem}")
