"""Samples of prepared cluster shards, decoded: the one tolerant reader of the data layer.

Training (:mod:`hdd_ray.training.data`), latent-space evaluation and the router's accuracy all
decode a sample the same way (:func:`decode_sample`: an image resized and cropped to the run's
size, or a latent sample's ``latent.npy`` of the configured shape) and read a split the same way
(:func:`read_samples`): a sample or shard that fails to read or decode is skipped and counted,
never raised, and logged once with its reason. :func:`iter_split` gives a split a batch at a
time (memory bounded by the batch, whatever the split's size), :func:`iter_images` the same
as evaluation compares it (latents decoded through the campaign's VAE), :func:`read_images` a
bounded number of them together; :func:`read_cluster` holds a whole (small) split in memory as
float32; :func:`read_decoded` decodes a latent split through the campaign's VAE.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hdd_ray.corpus import decode_image, iter_samples, prepare_image
from hdd_ray.errors import NoUsableData, first_line
from hdd_ray.latents import LATENT_MEMBER, load_vae, vae_info
from hdd_ray.models.text_features import TEXT_MEMBER, TextFeatures, decode_features, stack_features

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

#: one shard of a source: (path, label)
Shard = tuple[str, int]
#: what conditions one sample: its caption, or its stored text features (float16 [n, width])
Condition = str | np.ndarray


@dataclass(frozen=True)
class Decoding:
    """What one sample must decode to: ``[channels, size, size]`` uint8, or float16 latents."""

    image_size: int
    channels: int
    latents: bool = False
    image_key: str = "png"
    caption_key: str = "txt"
    latent_bytes: int = 2  # float16 storage; 4 for bfloat16-rounded latents (stored as float32)
    # stored text features (hdd_ray.models.text_features) in place of the caption: the tower's
    # context length and width; 0 = the caption itself
    text_length: int = 0
    text_width: int = 0

    @property
    def bytes_per_sample(self) -> int:
        """Decoded bytes of one sample (its stored text features counted at full length)."""
        return (self.channels * self.image_size ** 2 * (self.latent_bytes if self.latents else 1)
                + 2 * self.text_length * self.text_width)


def decode_sample(sample: dict[str, Any], how: Decoding) -> tuple[np.ndarray, Condition]:
    """A tar sample -> ``(array [C, H, W], condition)``; raises on any damage.

    The condition is the caption, or (``how.text_length``) the caption's stored features,
    float16 ``[n, width]`` (:mod:`hdd_ray.models.text_features`; batched by :func:`batch_conditions`).

    Images become uint8 (resized and cropped to ``image_size``); a latent sample's
    ``latent.npy`` (``np.save`` of float16 ``[C, h, w]``, already scaled) stays float16 and must
    have the configured shape; bfloat16-rounded latents, stored as float32 (float16 would
    overflow them), stay float32.
    """
    if "__error__" in sample:
        detail = sample.get("__detail__")
        raise ValueError(sample["__error__"] + (f" ({detail})" if detail else ""))
    caption: Condition = sample.get(how.caption_key, b"").decode("utf-8")
    if how.text_length:
        if TEXT_MEMBER not in sample:
            raise ValueError(f"no {TEXT_MEMBER} (stored text features)")
        caption = decode_features(sample[TEXT_MEMBER], how.text_width, how.text_length)
    if how.latents:
        arr = np.load(io.BytesIO(sample[LATENT_MEMBER]), allow_pickle=False)
        want = (how.channels, how.image_size, how.image_size)
        if arr.shape != want:
            raise ValueError(f"latent of shape {arr.shape}, expected {want}")
        keep = np.float32 if arr.dtype == np.float32 else np.float16
        return np.ascontiguousarray(arr, dtype=keep), caption
    img = prepare_image(decode_image(sample[how.image_key]), how.channels, how.image_size)
    return np.ascontiguousarray(img.transpose(2, 0, 1)), caption


def batch_conditions(conditions: list[Condition], how: Decoding) -> list[str] | TextFeatures:
    """A batch's conditions as the model takes them: the captions, or their stored features
    stacked into one :class:`hdd_ray.models.text_features.TextFeatures`."""
    if how.text_length:
        return stack_features(conditions, how.text_length)  # type: ignore[arg-type]
    return conditions  # type: ignore[return-value]


def to_model_space(x: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1]; float16 latents -> float32 (already scaled)."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def skip_reason(sample: dict[str, Any], exc: BaseException | str) -> str:
    """One line saying which sample was skipped and why (for the log)."""
    why = exc if isinstance(exc, str) else first_line(exc)
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '')!r} skipped: {why}"


def read_samples(shards: list[Shard], how: Decoding, label_from_json: bool = False
                 ) -> tuple[list[np.ndarray], list[Condition], list[int], int]:
    """Every sample of ``shards`` decoded -> ``(arrays, captions, labels, skipped)``.

    A shard's label is every one of its samples' label, or (``label_from_json``) each sample's
    ``cluster`` from its JSON. Damaged samples and unreadable shards are counted, never raised,
    and each skip is logged once with its reason.
    """
    arrays, captions, labels, skips = [], [], [], [0]
    for arr, cap, lab in iter_decoded(shards, how, label_from_json, skips):
        arrays.append(arr)
        captions.append(cap)
        labels.append(lab)
    return arrays, captions, labels, skips[0]


def iter_decoded(shards: list[Shard], how: Decoding, label_from_json: bool = False,
                 skipped: list[int] | None = None) -> Iterator[tuple[np.ndarray, Condition, int]]:
    """``(array, caption, label)`` of every usable sample of ``shards``, in order, one at a
    time (:func:`read_samples`' labels); each skip is logged once with its reason and counted
    in ``skipped[0]``."""
    count = skipped if skipped is not None else [0]
    for path, label in shards:
        try:
            for sample in iter_samples(path, include_damaged=True):
                try:
                    arr, cap = decode_sample(sample, how)
                    lab = int(json.loads(sample["json"])["cluster"]) if label_from_json else label
                except Exception as exc:
                    count[0] += 1
                    log.warning("%s", skip_reason(sample, exc))
                    continue
                yield arr, cap, lab
        except Exception as exc:  # unreadable shard the reader could not even open
            count[0] += 1
            log.warning("%s: shard skipped: %s", path, first_line(exc))


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
    ``[N, C, H, W]`` in [-1, 1] on the CPU (what evaluation compares samples with). The
    latents stay on the host; each decoded batch comes back to it."""
    vae = load_vae(vae_info(cfg.latents), device)
    shape = vae.info.shape(cfg.corpus.image_size)
    split = read_cluster(shards, int(shape[1]), int(shape[0]), latents=True)
    split.images = vae.decode(split.images)
    return split


#: samples per batch when evaluation reads a split a batch at a time (:func:`iter_images`)
EVAL_READ_BATCH = 256


def iter_images(cfg: CampaignConfig, shards: list[str], latents: dict[str, Any] | None,
                device: str | torch.device = "cpu", batch_size: int | None = None,
                limit: int | None = None) -> Iterator[ClusterData]:
    """A split as evaluation compares it, a batch at a time (at most ``limit`` samples): the
    images, or for a latent campaign (``latents``: the manifest's record) the latents decoded
    through the campaign's VAE on ``device``, each batch back on the host. Memory holds one
    batch (``batch_size``, else :data:`EVAL_READ_BATCH`) whatever the split's size."""
    vae = load_vae(vae_info(cfg.latents), device) if latents else None
    for batch in iter_split(shards, latents, cfg.corpus.image_size, cfg.corpus.channels,
                            batch_size or EVAL_READ_BATCH, limit=limit):
        if vae is not None:
            batch.images = vae.decode(batch.images)
        yield batch


def read_images(cfg: CampaignConfig, shards: list[str], latents: dict[str, Any] | None,
                device: str | torch.device = "cpu", limit: int | None = None) -> ClusterData:
    """:func:`iter_images`' first ``limit`` samples together (labels from the samples' JSON)."""
    parts = list(iter_images(cfg, shards, latents, device, limit=limit))
    return ClusterData(torch.cat([p.images for p in parts]),
                       [c for p in parts for c in p.captions],
                       torch.cat([p.labels for p in parts]), parts[-1].skipped)


def read_split(shards: list[str], latents: dict[str, Any] | None, image_size: int,
               channels: int, label: int | None = None) -> ClusterData:
    """A split as the networks see it: the latents of a latent-space campaign (``latents``,
    the manifest's record, gives their shape), else images of ``image_size`` and ``channels``."""
    if latents:
        c, h, _ = (int(v) for v in latents["shape"])
        return read_cluster(shards, h, c, label=label, latents=True)
    return read_cluster(shards, image_size, channels, label=label)


def iter_split(shards: list[str], latents: dict[str, Any] | None, image_size: int,
               channels: int, batch_size: int, label: int | None = None,
               limit: int | None = None) -> Iterator[ClusterData]:
    """:func:`read_split`'s samples ``batch_size`` at a time (the last batch may be smaller),
    the first ``limit`` usable ones at most: memory holds one batch, whatever the split's
    size. Raises :class:`NoUsableData` when nothing decodes."""
    if latents:
        c, h, _ = (int(v) for v in latents["shape"])
        how = Decoding(h, c, True)
    else:
        how = Decoding(image_size, channels)
    if limit is not None and limit <= 0:
        return
    skips, batch, seen = [0], [], 0
    sources = [(s, label if label is not None else -1) for s in shards]
    for item in iter_decoded(sources, how, label is None, skips):
        batch.append(item)
        seen += 1
        done = limit is not None and seen >= limit
        if len(batch) == batch_size or done:
            yield _as_split(batch, skips[0])
            batch = []
        if done:
            return
    if batch:
        yield _as_split(batch, skips[0])
    elif not seen:
        raise no_usable(shards, skips[0])


def _as_split(items: list[tuple[np.ndarray, str, int]], skipped: int) -> ClusterData:
    x = to_model_space(torch.from_numpy(np.stack([a for a, _, _ in items])))
    return ClusterData(x, [c for _, c, _ in items], torch.tensor([lab for _, _, lab in items]),
                       skipped)
