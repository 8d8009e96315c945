"""A cluster's prepared WebDataset shards in a training worker's memory, and batches from it.

Clusters are read into memory once per worker (the demo's 8x8 clusters are ~100 KB) with the
corpus module's tolerant reader; a batch is a random draw with the worker's own generator, whose
state is checkpointed, so a resumed run continues the same stream of batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.corpus import decode_image, iter_samples, prepare_image
from hdd_ray.errors import NoUsableData


@dataclass
class ClusterData:
    """Images ``[N, C, H, W]`` in [-1, 1], their captions and labels (cluster ids)."""

    images: Tensor
    captions: list[str]
    labels: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, list[str], Tensor]:
        """``n`` samples drawn with replacement."""
        idx = devices.randint(len(self), n, generator)  # on the CPU, where the images are
        return self.images[idx], [self.captions[i] for i in idx.tolist()], self.labels[idx]


def read_cluster(
    shards: list[str],
    image_size: int,
    channels: int,
    label: int | None = None,
    image_key: str = "png",
    caption_key: str = "txt",
) -> ClusterData:
    """Decode every sample of ``shards`` (undecodable or damaged ones are skipped and counted).

    ``label`` sets every sample's label; ``None`` reads ``cluster`` from each sample's JSON.
    Raises :class:`NoUsableData` when nothing decodes.
    """
    images, captions, labels, skipped = [], [], [], 0
    for shard in shards:
        try:
            for sample in iter_samples(shard, include_damaged=True):
                try:
                    if "__error__" in sample:
                        raise ValueError(sample["__error__"])
                    arr = prepare_image(decode_image(sample[image_key]), channels, image_size)
                    cap = sample.get(caption_key, b"").decode("utf-8")
                    lab = label if label is not None else int(json.loads(sample["json"])["cluster"])
                except Exception:
                    skipped += 1
                    continue
                images.append(arr.transpose(2, 0, 1))
                captions.append(cap)
                labels.append(lab)
        except Exception:  # unreadable shard (not a tar at all)
            skipped += 1
    if not images:
        where = shards[0].rsplit("/", 1)[0] if shards else "(no shards)"
        raise NoUsableData(f"no usable samples in {where} ({len(shards)} shards, {skipped} skipped)")
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0)
    return ClusterData(x, captions, torch.tensor(labels), skipped)
