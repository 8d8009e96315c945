"""Samples of prepared cluster shards, decoded: the one tolerant reader of the data layer.

Training (:mod:`hdd_ray.training.data`), latent-space evaluation and the router's accuracy all
decode a sample the same way (:func:`decode_sample`: an image resized and cropped to the run's
size, or a latent sample's ``latent.npy`` of the configured shape) and read a split the same way
(:func:`read_samples`): a sample or shard that fails to read or decode is skipped and counted,
never raised. :func:`read_cluster` holds a whole (small) split in memory as float32;
:func:`read_decoded` decodes a latent split through the campaign's VAE.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hdd_ray.corpus import decode_image, iter_samples, prepare_image
from hdd_ray.errors import NoUsableData
from hdd_ray.latents import LATENT_MEMBER, load_vae, vae_info

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

#: one shard of a source: (path, label)
Shard = tuple[str, int]


@dataclass(frozen=True)
class Decoding:
    """What one sample must decode to: ``[channels, size, size]`` uint8, or float16 latents."""

    image_size: int
    channels: int
    latents: bool = False
    image_key: str = "png"
    caption_key: str = "txt"
    latent_bytes: int = 2  # float16 storage; 4 for bfloat16-rounded latents (stored as float32)

    @property
    def bytes_per_sample(self) -> int:
        """Decoded bytes of one sample."""
        return self.channels * self.image_size ** 2 * (self.latent_bytes if self.latents else 1)


def decode_sample(sample: dict[str, Any], how: Decoding) -> tuple[np.ndarray, str]:
    """A tar sample -> ``(array [C, H, W], caption)``; raises on any damage.

    Images become uint8 (resized and cropped to ``image_size``); a latent sample's
    ``latent.npy`` (``np.save`` of float16 ``[C, h, w]``, already scaled) stays float16 and must
    have the configured shape; bfloat16-rounded latents, stored as float32 (float16 would
    overflow them), stay float32.
    """
    if "__error__" in sample:
        raise ValueError(sample["__error__"])
    caption = sample.get(how.caption_key, b"").decode("utf-8")
    if how.latents:
        arr = np.load(io.BytesIO(sample[LATENT_MEMBER]), allow_pickle=False)
        want = (how.channels, how.image_size, how.image_size)
        if arr.shape != want:
            raise ValueError(f"latent of shape {arr.shape}, expected {want}")
        keep = np.float32 if arr.dtype == np.float32 else np.float16
        return np.ascontiguousarray(arr, dtype=keep), caption
    img = prepare_image(decode_image(sample[how.image_key]), how.channels, how.image_size)
    return np.ascontiguousarray(img.transpose(2, 0, 1)), caption


def to_model_space(x: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1]; float16 latents -> float32 (already scaled)."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def read_samples(shards: list[Shard], how: Decoding, label_from_json: bool = False
                 ) -> tuple[list[np.ndarray], list[str], list[int], int]:
    """Every sample of ``shards`` decoded -> ``(arrays, captions, labels, skipped)``.

    A shard's label is every one of its samples' label, or (``label_from_json``) each sample's
    ``cluster`` from its JSON. Damaged samples and unreadable shards are counted, never raised.
    """
    arrays, captions, labels, skipped = [], [], [], 0
    for path, label in shards:
        try:
            for sample in iter_samples(path, include_damaged=True):
                try:
                    arr, cap = decode_sample(sample, how)
                    lab = int(json.loads(sample["json"])["cluster"]) if label_from_json else label
                except Exception:
                    skipped += 1
                    continue
                arrays.append(arr)
                captions.append(cap)
                labels.append(lab)
        except Exception:  # unreadable shard the reader could not even open
            skipped += 1
    return arrays, captions, labels, skipped


def no_usable(shards: list[str], skipped: int, who: str = "") -> NoUsableData:
    """The one-line error of a read that found no usable sample."""
    where = shards[0].rsplit("/", 1)[0] if shards else "(no shards)"
    return NoUsableData(f"no usable samples in {where}{who} ({len(shards)} shards, "
                        f"{skipped} skipped)")


@dataclass
class ClusterData:
    """Images ``[N, C, H, W]`` in [-1, 1] (or latents ``[N, C, h, w]``), their captions and
    labels (cluster ids): a whole split in memory, for evaluation (held-out sets, reference
    statistics)."""

    images: Tensor
    captions: list[str]
    labels: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]


def read_cluster(
    shards: list[str],
    image_size: int,
    channels: int,
    label: int | None = None,
    image_key: str = "png",
    caption_key: str = "txt",
    latents: bool = False,
) -> ClusterData:
    """Decode every sample of ``shards`` (undecodable or damaged ones are skipped and counted).

    For evaluation, which wants a whole split as float32; training reads through
    :func:`hdd_ray.training.data.open_source`. ``label`` sets every sample's label; ``None``
    reads ``cluster`` from each sample's JSON. With ``latents`` the samples' ``latent.npy``
    (``[channels, image_size, image_size]``, already scaled) are read instead of images.
    Raises :class:`NoUsableData` when nothing decodes.
    """
    how = Decoding(image_size, channels, latents, image_key, caption_key)
    arrays, captions, labels, skipped = read_samples(
        [(s, label if label is not None else -1) for s in shards], how, label is None)
    if not arrays:
        raise no_usable(shards, skipped)
    x = to_model_space(torch.from_numpy(np.stack(arrays)))
    return ClusterData(x, captions, torch.tensor(labels), skipped)


def read_decoded(cfg: CampaignConfig, shards: list[str],
                 device: str | torch.device = "cpu") -> ClusterData:
    """A latent split of ``shards`` decoded through the campaign's VAE on ``device``: images
    ``[N, C, H, W]`` in [-1, 1] on the CPU (what evaluation compares samples with)."""
    vae = load_vae(vae_info(cfg.latents), device)
    shape = vae.info.shape(cfg.corpus.image_size)
    split = read_cluster(shards, int(shape[1]), int(shape[0]), latents=True)
    split.images = vae.decode(split.images.to(vae.device)).cpu()
    return split


def read_split(shards: list[str], latents: dict[str, Any] | None, image_size: int,
               channels: int, label: int | None = None) -> ClusterData:
    """A split as the networks see it: the latents of a latent-space campaign (``latents``,
    the manifest's record, gives their shape), else images of ``image_size`` and ``channels``."""
    if latents:
        c, h, _ = (int(v) for v in latents["shape"])
        return read_cluster(shards, h, c, label=label, latents=True)
    return read_cluster(shards, image_size, channels, label=label)
