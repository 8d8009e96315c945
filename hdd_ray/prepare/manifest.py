"""The prepare stage's outputs besides the shards: arrays, assignments, montage, manifest.

``clusters/manifest.json`` is written last and marks completion. It records the settings, the
per-cluster counts, shards and content hashes, the skipped samples and a fingerprint of the
settings and input files (ARCHITECTURE.md shows the campaign directory).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hdd_ray import storage
from hdd_ray.corpus import decode_image, iter_samples

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

__all__ = [
    "HELDOUT",
    "MANIFEST_VERSION",
    "OUTPUT_FILES",
    "build_manifest",
    "cluster_hash",
    "content_listing",
    "format_summary",
    "reasons_line",
    "write_cluster_arrays",
    "write_montage",
]

MANIFEST_VERSION = 1
HELDOUT = "heldout"
MONTAGE_PER_CLUSTER = 16
#: the files the write step replaces (with the numbered cluster folders and ``heldout/``)
OUTPUT_FILES = {"centroids": "centroids.npy", "fine_centroids": "fine_centroids.npy",
                "assignments": "assignments.parquet", "montage": "montage.png"}


#: corpora up to this size (all shards together) are fingerprinted by their full content;
#: larger ones by size, mtime and the first and last block of every shard
FULL_HASH_LIMIT = 256 << 20
FINGERPRINT_BLOCK = 1 << 20


def content_listing(shards: list[str]) -> list[tuple[str, int, str]]:
    """``(path, size, content digest)`` of each input shard: the prepare stage's fingerprint.

    A corpus of at most :data:`FULL_HASH_LIMIT` bytes is hashed in full, so a rewrite that
    keeps every size and mtime (``cp -p``, ``rsync -a``) still changes it. A larger corpus
    hashes each shard's first and last :data:`FINGERPRINT_BLOCK` bytes (the first tar headers
    and the end of the archive) with its size and mtime: cheap on object stores, and any
    change of length, of the first or last samples, or of the mtime shows.
    """
    infos = []
    for path in shards:
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        infos.append((path, fs, inner, int(info.size or 0), int(info.mtime_ns or 0)))
    full = sum(size for *_, size, _ in infos) <= FULL_HASH_LIMIT
    out = []
    for path, fs, inner, size, mtime in infos:
        h = hashlib.sha256()
        if full:
            with fs.open_input_stream(inner) as f:
                while block := f.read(8 << 20):
                    h.update(block)
        else:
            h.update(f"mtime_ns={mtime}\n".encode())
            with fs.open_input_file(inner) as f:
                h.update(f.read(FINGERPRINT_BLOCK))
                if size > FINGERPRINT_BLOCK:
                    f.seek(max(FINGERPRINT_BLOCK, size - FINGERPRINT_BLOCK))
                    h.update(f.read(FINGERPRINT_BLOCK))
        out.append((path, size, ("sha256:" if full else "blocks:") + h.hexdigest()))
    return out


def cluster_entries(plan: Any, k: int, image_size: int, channels: int,
                    latents: dict[str, Any] | None = None) -> list[dict]:
    """The manifest's per-cluster records: train count, held-out count, shards, content hash
    (of the latents of ``latents``'s VAE in latent space)."""
    out = []
    for c in range(k):
        members = plan[(plan["cluster"] == c) & (plan["split"] == "train")]
        out.append({
            "cluster": c,
            "count": len(members),
            "heldout": int(((plan["cluster"] == c) & (plan["split"] == HELDOUT)).sum()),
            "shards": sorted(set(members["shard_path"])),
            "hash": cluster_hash(members["key"].tolist(), members["sha"].tolist(),
                                  image_size, channels, latents),
        })
    return out


def cluster_hash(keys: list[str], shas: list[str], image_size: int, channels: int,
                  latents: dict[str, Any] | None = None) -> str:
    """sha256 over sorted (key, sample sha) plus the output image size and channels (and, in
    latent space only, the VAE's identity, the latent shape and the scaling)."""
    h = hashlib.sha256(f"image_size={image_size};channels={channels}\n".encode())
    if latents:
        from hdd_ray.latents import identity_of

        h.update(f"latents={json.dumps(identity_of(latents), sort_keys=True)}\n".encode())
    for key, sha in sorted(zip(keys, shas, strict=True)):
        h.update(f"{key}\t{sha}\n".encode())
    return h.hexdigest()


def _ari(plan: Any) -> float | None:
    """Adjusted Rand index of the clusters against the samples' labels (None if unlabelled)."""
    labelled = plan["label"].to_numpy() >= 0
    if not labelled.any():
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(plan["label"][labelled], plan["cluster"][labelled]))


def build_manifest(
    cfg: CampaignConfig,
    *,
    fingerprint: str,
    uri: str,
    shards: list[str],
    dim: int,
    km: dict[str, np.ndarray],
    n_fit: int,
    plan: Any,
    skipped: dict[str, Any],
    clusters: list[dict],
    started: float,
    latents: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a finished prepare run (everything but ``mlflow_run_id``); ``shards``
    are the input shards it read (paths or URIs), listed in ``corpus.shards``.

    ``plan`` is the driver's per-sample plan, ``clusters`` its :func:`cluster_entries`,
    ``skipped`` the skip reasons and examples, ``started`` the stage's start time, ``latents``
    the VAE record in latent space (:func:`hdd_ray.latents.latent_record`; None = pixels).
    """
    cl, corpus = cfg.clustering, cfg.corpus
    heldout = plan[plan["split"] == HELDOUT]
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "k": cl.k,
        "image_size": corpus.image_size,
        "channels": corpus.channels,
        "corpus": {"source": corpus.source, "uri": uri, "num_shards": len(shards),
                   "shards": list(shards),
                   "image_key": corpus.image_key, "caption_key": corpus.caption_key},
        "embedder": {"name": cl.embedder, "arch": cl.embedder_arch,
                     "weights": cl.embedder_weights, "image_size": cl.embedder_image_size,
                     "pixel_size": cl.pixel_size if cl.embedder == "pixels" else None,
                     "dim": dim, "normalized": cl.embedder != "pixels"},
        "kmeans": {"fine_centroids": len(km["fine"]),
                   "requested_fine_centroids": cl.fine_centroids, "iters": cl.kmeans_iters,
                   "fit_sample_cap": cl.fit_sample_cap, "fit_samples": n_fit, "seed": cl.seed,
                   "balance_cap": cl.balance_cap, "metric": "squared_l2",
                   "fine_to_coarse": km["fine_to_coarse"].tolist()},
        "heldout_fraction": cl.heldout_fraction,
        "shard_size": corpus.shard_size,
        "num_samples": len(plan),
        "num_train": len(plan) - len(heldout),
        "num_heldout": len(heldout),
        "counts": [c["count"] for c in clusters],
        "heldout_counts": [c["heldout"] for c in clusters],
        "clusters": clusters,
        "heldout": {"count": len(heldout), "shards": sorted(set(heldout["shard_path"]))},
        "skipped": {"count": int(sum(skipped["reasons"].values())), **skipped},
        "data_hash": cluster_hash(plan["key"].tolist(), plan["sha"].tolist(),
                                   corpus.image_size, corpus.channels, latents),
        "latents": latents,
        "ari_vs_labels": _ari(plan),
        "files": {**OUTPUT_FILES, "embeddings": "embeddings"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - started, 2),
    }


def _first_images(clusters_dir: str, rel_shards: list[str],
                  decode: Any = None) -> list[np.ndarray]:
    """The first few images of a cluster (read back from its written shard) for the montage;
    with ``decode`` (latents ``[B, C, h, w]`` -> ``uint8 [B, H, W, C]``) from their latents."""
    from hdd_ray.latents import LATENT_MEMBER, decode_member

    paths = [storage.join(clusters_dir, r) for r in rel_shards]
    if decode is not None:
        latents = []
        for sample in iter_samples(paths, (LATENT_MEMBER,)):
            latents.append(decode_member(sample[LATENT_MEMBER]))
            if len(latents) >= MONTAGE_PER_CLUSTER:
                break
        return list(decode(np.stack(latents))) if latents else []
    out = []
    for sample in iter_samples(paths, ("png",)):
        arr = np.asarray(decode_image(sample["png"]))
        out.append(arr[:, :, None] if arr.ndim == 2 else arr)
        if len(out) >= MONTAGE_PER_CLUSTER:
            break
    return out


def _save_bytes(path: str, write: Any) -> None:
    """``write(buffer)`` into memory, then one write to ``path`` (local or remote)."""
    buf = io.BytesIO()
    write(buf)
    storage.write_bytes(path, buf.getvalue())


def write_cluster_arrays(clusters_dir: str, km: dict[str, np.ndarray], plan: Any) -> None:
    """``centroids.npy``, ``fine_centroids.npy`` and ``assignments.parquet`` (key order)."""
    import pyarrow.parquet as pq

    _save_bytes(storage.join(clusters_dir, OUTPUT_FILES["centroids"]),
                lambda buf: np.save(buf, km["coarse"]))
    _save_bytes(storage.join(clusters_dir, OUTPUT_FILES["fine_centroids"]),
                lambda buf: np.save(buf, km["fine"]))
    assignments = plan[["key", "url", "cluster", "distance", "split", "shard_path", "label"]]
    table = pa.Table.from_pandas(assignments.sort_values("key", kind="stable"),
                                 preserve_index=False)
    _save_bytes(storage.join(clusters_dir, OUTPUT_FILES["assignments"]),
                lambda buf: pq.write_table(table, buf))


def write_montage(clusters_dir: str, clusters: list[dict], decode: Any = None) -> Any:
    """``montage.png``: the first images of each cluster's first shard; returns the image.

    ``decode`` (latent space): latents ``[B, C, h, w]`` -> ``uint8 [B, H, W, C]`` images."""
    montage = _montage([_first_images(clusters_dir, c["shards"][:1], decode) for c in clusters])
    _save_bytes(storage.join(clusters_dir, OUTPUT_FILES["montage"]),
                lambda buf: montage.save(buf, format="PNG"))
    return montage


def _montage(rows: list[list[np.ndarray]], tile: int = 32, gap: int = 2) -> Any:
    """One row of samples per cluster, upscaled (nearest) so 8 px digits are visible."""
    from PIL import Image, ImageDraw

    cols = max((len(r) for r in rows), default=1) or 1
    margin = 24
    width = margin + cols * (tile + gap)
    canvas = Image.new("RGB", (width, max(1, len(rows)) * (tile + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, images in enumerate(rows):
        y = r * (tile + gap)
        draw.text((4, y + tile // 2 - 5), str(r), fill=(0, 0, 0))
        for c, arr in enumerate(images):
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB")
            canvas.paste(img.resize((tile, tile), Image.Resampling.NEAREST),
                         (margin + c * (tile + gap), y))
    return canvas


def reasons_line(reasons: dict[str, int]) -> str:
    """``reason=count, ...`` (sorted), or ``none``."""
    return ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())) or "none"


def format_summary(manifest: dict[str, Any]) -> str:
    """A small table of a manifest: per-cluster train / held-out counts and shards."""
    lines = [f"{'cluster':>8} {'train':>7} {'heldout':>8} {'shards':>7}"]
    for c in manifest["clusters"]:
        lines.append(f"{c['cluster']:>8} {c['count']:>7} {c['heldout']:>8} {len(c['shards']):>7}")
    lines.append(f"{'total':>8} {manifest['num_train']:>7} {manifest['num_heldout']:>8} "
                 f"{sum(len(c['shards']) for c in manifest['clusters']):>7}")
    skipped = manifest["skipped"]
    lines.append(f"skipped: {skipped['count']} ({reasons_line(skipped['reasons'])})")
    ari = manifest.get("ari_vs_labels")
    if ari is not None:
        lines.append(f"ARI vs labels: {ari:.3f}")
    lines.append(f"embedder: {manifest['embedder']['name']} (dim {manifest['embedder']['dim']}), "
                 f"data hash {manifest['data_hash'][:12]}")
    if manifest.get("latents"):
        lat = manifest["latents"]
        lines.append(f"latents: VAE {lat['identity']} ({lat['vae']}), shape "
                     f"{'x'.join(str(d) for d in lat['shape'])}, scaling {lat['scaling_factor']:g}"
                     f", shift {lat['shift_factor']:g}, {lat['dtype']}")
    return "\n".join(lines)
