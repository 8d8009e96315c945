"""Test helpers: a prepared cluster's shards decoded into memory (arrays + captions).

The package streams shards (``hdd_ray.training.data``); tests and benchmarks want a whole
cluster as one array to compare against.
"""

from __future__ import annotations

import numpy as np

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths
from hdd_ray.corpus import decode_image, iter_samples
from hdd_ray.errors import PrepareError

__all__ = ["load_cluster_arrays", "load_shard_arrays"]


def load_shard_arrays(
    shards: list[str], channels: int, image_key: str = "png", caption_key: str = "txt"
) -> tuple[np.ndarray, list[str]]:
    """Decode shards into ``(images float32 [N, C, H, W] in [-1, 1], captions)``.

    ``x = pixel / 127.5 - 1``. All images must share one size (the prepared shards do).
    """
    images, captions = [], []
    for sample in iter_samples(shards, suffixes=(image_key, caption_key)):
        arr = np.asarray(decode_image(sample[image_key]).convert("L" if channels == 1 else "RGB"))
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        captions.append(sample[caption_key].decode("utf-8"))
    if not images:
        return np.zeros((0, channels, 0, 0), np.float32), []
    x = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return x, captions


def load_cluster_arrays(
    paths: CampaignPaths | str, cluster: int | str
) -> tuple[np.ndarray, list[str]]:
    """One cluster's training shards (or ``"heldout"``) of a prepared campaign, in memory.

    Reads ``clusters/manifest.json`` for the shard list and channel count; returns
    ``(images float32 [N, C, H, W] in [-1, 1], captions)`` in key order.
    """
    paths = CampaignPaths(paths) if isinstance(paths, str) else paths
    if not storage.exists(paths.manifest):
        raise PrepareError(f"{paths.manifest}: not found (run jobs/prepare_corpus.py first)")
    manifest = storage.read_json(paths.manifest)
    if cluster == "heldout":
        rel = manifest["heldout"]["shards"]
    else:
        k = int(cluster)
        if not 0 <= k < manifest["k"]:
            raise PrepareError(f"cluster {cluster!r}: outside 0..{manifest['k'] - 1}")
        rel = manifest["clusters"][k]["shards"]
    shards = [storage.join(paths.clusters, r) for r in rel]
    return load_shard_arrays(shards, int(manifest["channels"]))


def write_digit_shard(path: str, digit: int, count: int, caption: str) -> str:
    """One WebDataset shard of the first ``count`` demo scans of ``digit`` (PNG, ``caption``,
    cluster 0), as prepare writes a cluster's shard; returns ``path``."""
    import io
    import json

    from PIL import Image
    from sklearn.datasets import load_digits

    from hdd_ray.corpus import write_tar

    digits = load_digits()
    samples = []
    for i in np.nonzero(digits.target == digit)[0][:count]:
        buf = io.BytesIO()
        Image.fromarray((digits.images[i] * 15.9).astype(np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"d{i:05d}", "png": buf.getvalue(),
                        "txt": caption.encode(), "json": json.dumps({"cluster": 0}).encode()})
    write_tar(path, samples)
    return path
