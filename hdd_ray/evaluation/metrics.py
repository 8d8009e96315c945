"""The metrics, one implementation of each: FID (and its floor), CLIP score, intra-prompt diversity.

All images are ``[N, C, H, W]`` float tensors in [-1, 1] (``C`` 1 or 3), as the samplers and
:func:`hdd_ray.samples.read_cluster` produce them.

* FID is the Fréchet distance of the chosen extractor's features
  (:func:`hdd_ray.evaluation.features.build_extractor`; float64, unbiased covariances as in
  torchmetrics), computed by :func:`hdd_ray.evaluation.statistics.frechet_distance`, so
  Inception-FID, CLIP-FID and FD-DINOv2 and their bootstrap replicates share one
  implementation. Statistics of a reference set are cached (:class:`ReferenceStats`), and every
  FID is reported beside its floor (:func:`fid_floor`: held-out real images against the
  training split) at the same n.
* CLIP score is torchmetrics' definition, ``100 * mean(max(cos(img, txt), 0))``, for any
  open_clip-style model (torchmetrics' own ``CLIPScore`` only takes Hugging Face models);
  :func:`clip_scores` gives the per-sample terms.
* Diversity is the mean pairwise distance among samples of one prompt, averaged over prompts:
  LPIPS when its backbone weights are on disk, otherwise distances between normalized extractor
  features (or pixels); the returned name says which. :func:`group_diversities` gives the
  per-prompt values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from hdd_ray import storage
from hdd_ray.errors import WeightsMismatch
from hdd_ray.evaluation.features import clip_pixels, extract_features, to_rgb
from hdd_ray.evaluation.statistics import FrechetReference, fid_at_n

__all__ = [
    "DIVERSITY_NAMES",
    "ReferenceStats",
    "clip_score",
    "clip_scores",
    "diversity",
    "fid",
    "fid_floor",
    "group_diversities",
    "images_hash",
    "lpips_backbone_path",
    "reference_stats",
]

DIVERSITY_NAMES = ("lpips_diversity", "feature_diversity", "pixel_diversity")
_LPIPS_MIN_SIZE = 64  # AlexNet's 11x11/4 stem and three poolings leave nothing of an 8 px image


def images_hash(images: Tensor) -> str:
    """sha256 (hex) of an image set's shape and float32 values: a data hash for ad-hoc sets.

    Campaign stages should prefer the data hashes of the prepare stage's manifest, which do not
    need the images in memory.
    """
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- FID


def _feature_sums(images: Tensor | Iterable[Tensor], extractor: nn.Module,
                  batch_size: int) -> tuple[Tensor, Tensor, int]:
    """Sum of float64 features ``[D]``, of their outer products ``[D, D]``, and the count,
    batch by batch (``images``: a tensor, or image batches as they are read)."""
    total = torch.zeros(int(extractor.num_features), dtype=torch.float64)
    outer = torch.zeros(total.numel(), total.numel(), dtype=torch.float64)
    batches = ((images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
               if isinstance(images, Tensor) else images)
    count = 0
    with torch.no_grad():
        for batch in batches:
            f = extract_features(extractor, batch, batch_size).double()
            total += f.sum(0)
            outer += f.T @ f
            count += int(f.shape[0])
    return total, outer, count


@dataclass
class ReferenceStats:
    """FID statistics of a reference image set under one extractor, as torchmetrics keeps them.

    ``features_sum`` = sum of feature vectors ``[D]`` and ``features_cov_sum`` = sum of their
    outer products ``[D, D]`` (float64), over ``num_samples`` images: mean and covariance follow
    (:attr:`mean`, :attr:`cov`), and the sums load straight into the metric's ``real`` state.
    ``loaded`` says whether they came from the cache file ``path``.
    """

    extractor: str
    data_hash: str
    num_samples: int
    features_sum: Tensor
    features_cov_sum: Tensor
    loaded: bool = False
    path: str | None = None

    @property
    def mean(self) -> Tensor:
        """Mean feature ``[D]``."""
        return self.features_sum / self.num_samples

    @property
    def cov(self) -> Tensor:
        """Unbiased feature covariance ``[D, D]`` (as torchmetrics computes it)."""
        mu = self.mean[None]
        return (self.features_cov_sum - self.num_samples * mu.t() @ mu) / (self.num_samples - 1)

    def frechet(self) -> FrechetReference:
        """The reference Gaussian FIDs are computed against."""
        return FrechetReference.from_moments(self.mean, self.cov)

    def to_bytes(self) -> bytes:
        """safetensors bytes: the two sums, with extractor, data hash and count as metadata."""
        tensors = {
            "features_sum": self.features_sum.double().contiguous(),
            "features_cov_sum": self.features_cov_sum.double().contiguous(),
        }
        meta = {
            "extractor": self.extractor,
            "data_hash": self.data_hash,
            "num_samples": str(self.num_samples),
        }
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes, path: str | None = None) -> ReferenceStats:
        """Inverse of :meth:`to_bytes` (``loaded=True``)."""
        meta = _safetensors_metadata(blob)
        tensors = load_safetensors(blob)
        return cls(
            extractor=meta["extractor"],
            data_hash=meta["data_hash"],
            num_samples=int(meta["num_samples"]),
            features_sum=tensors["features_sum"],
            features_cov_sum=tensors["features_cov_sum"],
            loaded=True,
            path=path,
        )


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (an 8-byte header length, then JSON)."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]).get("__metadata__", {})


def _stats_file(extractor_name: str, data_hash: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_name)
    return f"{safe}-{data_hash[:16]}.safetensors"


def reference_stats(
    images: Tensor | Callable[[], Tensor | Iterable[Tensor]],
    extractor: nn.Module,
    data_hash: str,
    cache_dir: str | None = None,
    batch_size: int = 256,
) -> ReferenceStats:
    """FID statistics of a reference set, from ``cache_dir`` when computed before.

    The cache entry is ``<cache_dir>/<extractor name>-<data_hash[:16]>.safetensors`` (no pickles;
    local path or URI): a different extractor (or extractor weights, which its name encodes) or a
    different data hash is a different entry. ``images`` may be a callable that loads them, or
    that gives them batch by batch (the sums are running sums: a split of any size), so a
    cached reference never reads its images. ``cache_dir=None`` computes without caching.
    """
    name = str(extractor.name)
    path = storage.join(cache_dir, _stats_file(name, data_hash)) if cache_dir else None
    if path is not None and storage.exists(path):
        stats = ReferenceStats.from_bytes(storage.read_bytes(path), path=path)
        if stats.extractor == name and stats.data_hash == data_hash:
            return stats
    imgs = images() if callable(images) else images
    total, outer, count = _feature_sums(imgs, extractor, batch_size)
    stats = ReferenceStats(extractor=name, data_hash=data_hash, num_samples=count,
                           features_sum=total, features_cov_sum=outer, path=path)
    if path is not None:
        storage.write_bytes(path, stats.to_bytes())
    return stats


def _reference(reference: ReferenceStats | Tensor, extractor: nn.Module,
               batch_size: int) -> FrechetReference:
    if isinstance(reference, ReferenceStats):
        if reference.extractor != extractor.name:
            raise ValueError(
                f"reference statistics were computed with {reference.extractor!r}, "
                f"not {extractor.name!r}"
            )
        return reference.frechet()
    return reference_stats(reference, extractor, data_hash="", batch_size=batch_size).frechet()


def fid(
    fake_images: Tensor,
    reference: ReferenceStats | Tensor,
    extractor: nn.Module,
    batch_size: int = 256,
) -> float:
    """Frechet distance between ``fake_images`` and a reference, in ``extractor``'s feature space.

    ``FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (float64, unbiased
    covariances). ``reference`` is cached :class:`ReferenceStats` (which must come from the same
    extractor) or an image tensor. FID is biased upward at small N: compare values only at equal
    N, and beside :func:`fid_floor` computed at that N.
    """
    ref = _reference(reference, extractor, batch_size)
    features = extract_features(extractor, fake_images, batch_size)
    return float(fid_at_n(features, ref, int(features.shape[0])))


def fid_floor(
    heldout_images: Tensor,
    train_images: ReferenceStats | Tensor,
    extractor: nn.Module,
    num_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """FID of real held-out images against the training split: the floor beside every FID.

    A mixture's samples are compared with the training split; real images the experts never saw,
    compared the same way, show how low that FID can go at this n with this extractor (finite-n
    bias plus the true gap between the splits). ``train_images`` may be the training split's
    cached :class:`ReferenceStats`. ``num_samples`` (default: all held-out images) is the n the
    floor is taken at, which must be the n of the FID it accompanies: below the held-out count
    it is the mean over seeded random subsets of that size
    (:func:`~hdd_ray.evaluation.statistics.fid_at_n`); above it, a ValueError (take the FID at
    the smaller n instead, :func:`~hdd_ray.evaluation.statistics.comparable_n`).
    """
    n = heldout_images.shape[0] if num_samples is None else num_samples
    if n > heldout_images.shape[0]:
        raise ValueError(f"fid_floor at n={n} needs {n} held-out images, got "
                         f"{heldout_images.shape[0]}: compare FIDs at n <= the held-out count")
    ref = _reference(train_images, extractor, batch_size)
    return fid_at_n(extract_features(extractor, heldout_images, batch_size), ref, n, seed=seed)


# --------------------------------------------------------------------------------- CLIP score


def clip_score(
    images: Tensor,
    captions: Sequence[str],
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    batch_size: int = 256,
) -> float:
    """``100 * mean_i max(cos(E_img(x_i), E_txt(c_i)), 0)`` (torchmetrics' CLIPScore definition).

    ``model`` is open_clip-style (``encode_image``, ``encode_text``; images preprocessed by
    :func:`~hdd_ray.evaluation.features.clip_pixels`), ``tokenizer`` maps captions to token ids.
    """
    return float(clip_scores(images, captions, model, tokenizer, batch_size).mean())


@torch.no_grad()
def clip_scores(
    images: Tensor,
    captions: Sequence[str],
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    batch_size: int = 256,
) -> Tensor:
    """The per-sample terms of :func:`clip_score`: ``100 * max(cos(E_img(x_i), E_txt(c_i)), 0)``
    -> ``[N]`` float32 on the CPU."""
    if images.shape[0] != len(captions) or not captions:
        raise ValueError(
            f"clip_score needs one caption per image, got {images.shape[0]} images and "
            f"{len(captions)} captions"
        )
    device = next(model.parameters()).device
    scores = []
    for i in range(0, images.shape[0], batch_size):
        img = model.encode_image(clip_pixels(images[i : i + batch_size].to(device), model))
        txt = model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append(100.0 * cos.clamp(min=0.0).cpu())
    return torch.cat(scores)


# --------------------------------------------------------------------------------- diversity


def lpips_backbone_path(lpips_weights: str | None = None) -> str | None:
    """The local AlexNet file LPIPS needs, or ``None`` when there is none (no download is tried).

    ``lpips_weights`` names the file explicitly (it must exist); otherwise torch hub's cache is
    checked for the file torchvision would download (``alexnet-owt-7be5be79.pth``).
    torchmetrics ships LPIPS's linear heads; only this backbone is fetched from the network.
    """
    if lpips_weights:
        path = os.path.expanduser(lpips_weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lpips_weights={lpips_weights!r}: no such file")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", _alexnet_file_name())
    return cached if os.path.isfile(cached) else None


def _alexnet_file_name() -> str:
    from torchvision.models import AlexNet_Weights

    return os.path.basename(AlexNet_Weights.DEFAULT.url)


def _alexnet_state(backbone: str) -> dict[str, Tensor]:
    """The tensors of the AlexNet file ``backbone``, read without unpickling arbitrary objects.

    A ``.safetensors`` file is read with safetensors; anything else (torchvision's
    ``alexnet-owt-7be5be79.pth``) with ``torch.load(weights_only=True)``, which admits tensors and
    plain containers only. A file holding anything else raises :class:`WeightsMismatch` (one line).
    """
    try:
        if backbone.endswith(".safetensors"):
            with open(backbone, "rb") as f:
                state: Any = load_safetensors(f.read())
        else:
            state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for objects, RuntimeError for a truncated file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsMismatch(f"lpips backbone {backbone!r}: not a plain tensor file, refused "
                              f"(weights only): {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsMismatch(f"lpips backbone {backbone!r}: not a state dict of tensors")
    return state


@contextlib.contextmanager
def _backbone_from(state: dict[str, Tensor]) -> Iterator[None]:
    """While open, torchmetrics' LPIPS builds its AlexNet from ``state`` (its ``features.*``).

    torchmetrics would build the backbone through torchvision's pretrained weights, which go
    through ``torch.hub.load_state_dict_from_url`` (a download, and ``weights_only=False``).
    Here the backbone is built on the meta device (no file, no network, no random
    initialisation) and takes the tensors given, strictly: a file that is not an AlexNet raises
    :class:`WeightsMismatch`. The hook is process-global: don't build LPIPS from several
    threads at once.
    """
    from torchmetrics.functional.image import lpips as tm_lpips

    build = tm_lpips._get_tv_model_features
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}

    def local_features(net: str, pretrained: bool = False) -> nn.Sequential:
        if net != "alexnet":
            raise WeightsMismatch(f"lpips backbone: only alexnet is supported, not {net!r}")
        with torch.device("meta"):  # no random init to overwrite (AlexNet's FC is 37M draws)
            module = build(net, pretrained=False)
        try:
            module.load_state_dict(features, strict=True, assign=True)
        except RuntimeError as exc:
            raise WeightsMismatch(f"lpips backbone: not AlexNet weights "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        return module

    tm_lpips._get_tv_model_features = local_features
    try:
        yield
    finally:
        tm_lpips._get_tv_model_features = build


def _lpips_metric(backbone: str) -> Any:
    """torchmetrics' LPIPS (AlexNet) with its backbone read from the local file ``backbone``."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    state = _alexnet_state(backbone)
    with _backbone_from(state):
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean")


def _pairs(n: int) -> tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


def diversity(
    groups: Sequence[Tensor],
    extractor: nn.Module | None = None,
    lpips_weights: str | None = None,
    batch_size: int = 256,
) -> tuple[str, float]:
    """Intra-prompt diversity -> ``(name, value)``: mean pairwise distance within each group
    (the samples of one prompt), averaged over groups with at least two samples.

    * ``lpips_diversity``: LPIPS (AlexNet) between every pair, the paper's measure; used when its
      backbone is on disk (:func:`lpips_backbone_path`). Images under 64 px are upsampled first.
    * ``feature_diversity``: L2 distance between L2-normalized ``extractor`` features (0..2).
    * ``pixel_diversity``: root-mean-square pixel difference, when no extractor is given.

    Identical samples give 0 under all three.
    """
    name, values = group_diversities(groups, extractor, lpips_weights, batch_size)
    return name, float(values.mean())


@torch.no_grad()
def group_diversities(
    groups: Sequence[Tensor],
    extractor: nn.Module | None = None,
    lpips_weights: str | None = None,
    batch_size: int = 256,
) -> tuple[str, Tensor]:
    """The per-group terms of :func:`diversity` -> ``(name, [G] float64)``, one value per group
    of two or more samples, in the order given."""
    usable = [g for g in groups if g.shape[0] >= 2]
    if not usable:
        raise ValueError("diversity needs at least one group with two or more samples")
    backbone = lpips_backbone_path(lpips_weights)
    if backbone is not None:
        metric = _lpips_metric(backbone)
        values = []
        for group in usable:
            x = to_rgb(group.float()).clamp(-1, 1)
            if min(x.shape[-2:]) < _LPIPS_MIN_SIZE:
                x = F.interpolate(x, size=(_LPIPS_MIN_SIZE,) * 2, mode="bilinear", antialias=False)
            i, j = _pairs(x.shape[0])
            metric.reset()
            for k in range(0, i.numel(), batch_size):
                metric.update(x[i[k : k + batch_size]], x[j[k : k + batch_size]])
            values.append(float(metric.compute()))
        return "lpips_diversity", torch.tensor(values, dtype=torch.float64)
    values = []
    for group in usable:
        if extractor is not None:
            z = F.normalize(extract_features(extractor, group, batch_size).double(), dim=-1)
        else:  # RMS over pixels: comparable across image sizes
            z = group.double().flatten(1) / group[0].numel() ** 0.5
        values.append(float(torch.pdist(z).mean()))
    name = "feature_diversity" if extractor is not None else "pixel_diversity"
    return name, torch.tensor(values, dtype=torch.float64)
