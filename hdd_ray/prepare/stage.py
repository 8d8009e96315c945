"""The prepare stage: embed the corpus, cluster it, write per-cluster shards and the manifest.

Long because the stage's steps and the checks that guard them (before Ray: the VAE, the text
tower, key names, weights; the fingerprints that decide reuse) read best in one place, in order.

:func:`prepare_corpus` is the first stage of every campaign and reads as its steps:

1. **reuse check** -- a complete result with the same fingerprint (settings + input files) is
   returned as it is;
2. **embed** -- the embed pass (:mod:`hdd_ray.prepare.passes`), reused when only clustering
   settings changed (with a frozen text tower it stores each caption's features too:
   :mod:`hdd_ray.models.text_features`; the manifest's ``text_features`` record says which);
3. **fit** -- the driver fits ``fine_centroids`` k-means centroids on a capped sample and
   merges them into K coarse clusters (:mod:`hdd_ray.clustering`);
4. **assign** -- the assign pass gives every sample's distance to each coarse centroid; the
   driver picks each sample's cluster (nearest, or balanced under a cap), the stratified
   held-out split and the shard each sample goes to;
5. **write** -- the write pass writes the shards; the driver writes centroids and assignments;
6. **manifest** -- ``clusters/manifest.json``, written last: it marks completion.

Streaming throughout, so the corpus never has to fit in memory (ARCHITECTURE.md describes the
data flow and the campaign directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hdd_ray import storage, towers
from hdd_ray.campaign import (
    CampaignPaths,
    generation_view,
    generations,
    short_hash,
    text_features_record,
)
from hdd_ray.clustering import assign_clusters, fit_hierarchical_kmeans, heldout_mask
from hdd_ray.config import to_dict
from hdd_ray.corpus import first_sample, list_shards, write_demo_corpus
from hdd_ray.errors import ConfigError, PrepareError
from hdd_ray.latents import (
    IDENTITY_KEYS,
    SETTINGS_KEYS,
    check_same_vae,
    identity_of,
    latent_record,
    load_vae,
    vae_info,
)
from hdd_ray.prepare.embedders import check_embedder
from hdd_ray.prepare.manifest import (
    HELDOUT,
    MANIFEST_VERSION,
    OUTPUT_FILES,
    build_manifest,
    cluster_entries,
    content_listing,
    reasons_line,
    write_cluster_arrays,
    write_montage,
)
from hdd_ray.prepare.passes import assign_pass, embed_pass, read_parquet_columns, write_pass

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig, ClusteringConfig
    from hdd_ray.latents import VaeInfo

__all__ = ["fingerprint_of", "prepare_corpus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Inputs:
    """The corpus shards of a run and the fingerprints they give with the settings."""

    shards: list[str]
    uri: str
    embed_fp: str  # what the embeddings depend on
    fingerprint: str  # what the whole result depends on


def prepare_corpus(cfg: CampaignConfig, force: bool = False,
                   ray_address: str | None = None) -> dict:
    """Embed and cluster the corpus into K per-cluster shards; returns the manifest.

    Reuses a complete result with the same fingerprint (settings + input files) unless
    ``force``; the returned dict is the manifest plus ``"reused": bool``. Checks what can be
    checked (paths, key names, weights) before Ray starts; then, unless Ray is initialised
    already, joins ``ray_address`` (else ``cfg.ray.address``, else RAY_ADDRESS) or starts a
    local instance (:func:`hdd_ray.placement.init_ray`). Raises :class:`PrepareError` with one line
    on bad input.

    Columns of ``clusters/embeddings/*.parquet``: key, url, png (converted + resized), caption,
    meta (JSON text), label (-1 = none), sha (sample digest), prio (sampling order), skip
    (reason, "" = ok), embedding (float32[D]).
    """
    started = time.time()
    root = storage.absolute(cfg.root)  # URIs (file:// too) as given: storage resolves them
    paths = CampaignPaths(root)
    vae = _vae(cfg)  # latent space: the VAE checked (one line) before anything else
    text = _text_features(cfg)  # a frozen text tower's features, stored beside each sample
    inputs = _inputs(cfg, paths)
    if not force and (old := _reusable_manifest(paths, inputs.fingerprint)) is not None:
        return {**old, "reused": True}
    if not force:
        _refuse_latents_change(cfg, paths, vae)
    _check_before_ray(cfg, inputs)
    storage.remove(paths.manifest)  # from here on the old result is no longer complete
    _start_ray(cfg, ray_address)

    embed_dir, dim = _embed(cfg, paths, inputs, force, vae, text)
    ok, skipped = _decodable_rows(embed_dir, cfg.clustering.k, inputs.uri)
    km, n_fit = _fit(embed_dir, ok, cfg.clustering, dim)
    plan = _assign(embed_dir, ok, km["coarse"], cfg)
    sizes = _write(cfg, paths.clusters, embed_dir, plan, km, latent=vae is not None,
                   text=text is not None)
    if text is not None:  # what the stored features cost on storage
        text = {**text, "bytes": sizes["text_bytes"], "shard_bytes": sizes["bytes"]}
        log.info("prepare: stored text features: %.1f MB of %.1f MB of shards (+%.0f %%)",
                 sizes["text_bytes"] / 1e6, sizes["bytes"] / 1e6,
                 100 * sizes["text_bytes"] / max(1, sizes["bytes"] - sizes["text_bytes"]))
    return _write_manifest(cfg, paths, inputs, dim=dim, km=km, n_fit=n_fit, plan=plan,
                           skipped=skipped, started=started, vae=vae, text=text)


# --------------------------------------------------------------------------- reuse check


def _inputs(cfg: CampaignConfig, paths: CampaignPaths) -> _Inputs:
    """The input shards and the fingerprints of this run's settings and inputs."""
    shards, uri = _input_shards(cfg, paths)
    listing = content_listing(shards)  # content, not mtimes: `cp -p` of new data re-prepares
    embed_fp = short_hash({"v": MANIFEST_VERSION, "inputs": listing, **_embed_settings(cfg)}, n=64)
    fingerprint = short_hash({"embed": embed_fp, **_kmeans_settings(cfg)}, n=64)
    return _Inputs(shards, uri, embed_fp, fingerprint)


def _input_shards(cfg: CampaignConfig, paths: CampaignPaths) -> tuple[list[str], str]:
    """The corpus shards (writing the demo corpus first when ``corpus.source=demo``)."""
    if cfg.corpus.source == "demo":
        shards = write_demo_corpus(paths.corpus, cfg.corpus.shard_size)
        return shards, paths.corpus
    uri = str(cfg.corpus.uri)
    shards = [s if storage.is_uri(s) else os.path.abspath(s) for s in list_shards(uri)]
    return shards, uri


def _reusable_manifest(paths: CampaignPaths, fingerprint: str) -> dict | None:
    """The complete result's manifest when its fingerprint matches, else None."""
    if not storage.exists(paths.manifest):
        return None
    try:
        old = storage.read_json(paths.manifest)
    except (ValueError, OSError) as exc:
        log.warning("prepare: %s is corrupt (%s): preparing the corpus again", paths.manifest,
                    str(exc).splitlines()[0][:120])
        return None
    if not isinstance(old, dict) or not isinstance(old.get("clusters"), list):
        log.warning("prepare: %s is not a manifest: preparing the corpus again", paths.manifest)
        return None
    # a grown campaign: each cluster set it has had is reused by the settings that name it
    # (its clustering.k), as the view of that generation (hdd_ray.campaign.generations)
    try:
        gens = generations(old)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("prepare: %s is corrupt (%s): preparing the corpus again", paths.manifest,
                    str(exc).splitlines()[0][:120])
        return None
    match = next((g for i, g in enumerate(gens) if fingerprint == (
        old.get("fingerprint") if i == 0 else g.get("fingerprint"))), None)
    if match is None:
        return None
    log.info("prepare: reusing %s (same settings and inputs; --force recomputes)",
             paths.manifest)
    return generation_view(old, int(match["k"]))


def fingerprint_of(cfg: CampaignConfig) -> str:
    """What prepare's reuse check compares for ``cfg``: its settings and input files."""
    return _inputs(cfg, CampaignPaths(storage.absolute(cfg.root))).fingerprint


# --------------------------------------------------------------------------- checks


def _vae(cfg: CampaignConfig) -> VaeInfo | None:
    """The campaign's VAE (:class:`hdd_ray.latents.VaeInfo`), None in pixel space; a missing
    folder, a non-``AutoencoderKL``, wrong channels or an image size its downsampling factor
    does not divide fail in one line."""
    if not cfg.latents.vae:
        return None
    try:
        return vae_info(cfg.latents, cfg.corpus.image_size, cfg.corpus.channels)
    except ConfigError as exc:
        raise PrepareError(str(exc)) from None


def _text_features(cfg: CampaignConfig) -> dict[str, Any] | None:
    """The ``text_features`` record of the experts' frozen text tower (None: the captions are
    enough, :func:`hdd_ray.campaign.text_features_record`); an unknown architecture or a
    missing weights file fails in one line before Ray starts."""
    try:
        return text_features_record(to_dict(cfg.experts.text))
    except (ValueError, OSError) as exc:
        raise PrepareError(str(exc).splitlines()[0]) from None


def _refuse_latents_change(cfg: CampaignConfig, paths: CampaignPaths,
                           vae: VaeInfo | None) -> None:
    """A prepared corpus of other ``latents`` settings (the VAE's identity and content, latent
    shape, scaling, shift, dtype: :func:`hdd_ray.latents.check_same_vae`) is never mixed with:
    refuse unless ``--force`` (which prepares the corpus again)."""
    if not storage.exists(paths.manifest):
        return
    try:
        old = storage.read_json(paths.manifest)
    except (ValueError, OSError):
        return  # unreadable: prepared again anyway
    if not isinstance(old, dict):
        return
    want = latent_record(vae, cfg.corpus.image_size) if vae is not None else None
    check_same_vae([("the config", want),
                    (f"the corpus at {paths.clusters}", old.get("latents"))], PrepareError,
                   keys=(*IDENTITY_KEYS, *SETTINGS_KEYS),
                   message="latents: {name} was prepared in {other}, the config asks for "
                           "{first}{differs}: re-run with --force to prepare it again (its "
                           "experts will not be reused), or set latents back")


def _check_first_sample(shards: list[str], uri: str, image_key: str, caption_key: str) -> None:
    """Wrong key names show on the first sample: fail before Ray starts."""
    sample = first_sample(shards)
    if sample is None:
        raise PrepareError(f"corpus {uri!r}: no readable sample in its first shards")
    have = sorted(k for k in sample if not k.startswith("__"))
    for name, key in (("image_key", image_key), ("caption_key", caption_key)):
        if key not in sample:
            raise PrepareError(
                f"corpus.{name}={key!r}: no such member in sample {sample['__key__']!r} of "
                f"{sample['__url__']} (it has: {', '.join(have)})"
            )


def _check_before_ray(cfg: CampaignConfig, inputs: _Inputs) -> None:
    """Everything that can fail with one line before Ray starts."""
    cl, corpus = cfg.clustering, cfg.corpus
    _check_first_sample(inputs.shards, inputs.uri, corpus.image_key, corpus.caption_key)
    check_embedder(cl)
    if cfg.tracking.enabled:
        from hdd_ray.tracking import tracking_uri

        try:
            tracking_uri(cfg)  # a remote root needs an explicit tracking.uri: say so now
        except ValueError as exc:
            raise PrepareError(str(exc)) from None
    if cl.fit_sample_cap < cl.k:
        raise PrepareError(f"clustering.fit_sample_cap={cl.fit_sample_cap}: must be >= k={cl.k}")


def _start_ray(cfg: CampaignConfig, ray_address: str | None) -> None:
    """Join ``ray_address`` (else the config's cluster) unless Ray is initialised already."""
    from hdd_ray.placement import init_ray

    init_ray(replace(cfg, ray=replace(cfg.ray, address=ray_address)) if ray_address else cfg)


# --------------------------------------------------------------------------- embed


def _embed(cfg: CampaignConfig, paths: CampaignPaths, inputs: _Inputs, force: bool,
           vae: VaeInfo | None = None, text: dict[str, Any] | None = None) -> tuple[str, int]:
    """The embeddings directory and dimension: reused when the embed fingerprint matches."""
    embed_dir = storage.join(paths.clusters, "embeddings")
    embed_marker = storage.join(paths.clusters, "embeddings.json")
    marker = storage.read_json(embed_marker) if storage.exists(embed_marker) else {}
    if not force and marker.get("fingerprint") == inputs.embed_fp:
        log.info("prepare: reusing embeddings in %s", embed_dir)
        return embed_dir, int(marker["dim"])
    return embed_dir, embed_pass(cfg, inputs.shards, embed_dir, embed_marker, inputs.embed_fp,
                                 latents=vae, text=text)


def _decodable_rows(embed_dir: str, k: int, uri: str) -> tuple[Any, dict[str, Any]]:
    """The embedded rows that can be clustered and the skipped summary; too few is an error."""
    ok, skipped = _load_rows(embed_dir)
    n_skipped = int(sum(skipped["reasons"].values()))
    if n_skipped:
        log.warning("prepare: skipped %d samples (%s)", n_skipped,
                    reasons_line(skipped["reasons"]))
    if len(ok) == 0:
        raise PrepareError(f"corpus {uri!r}: no decodable sample ({n_skipped} skipped: "
                           f"{reasons_line(skipped['reasons'])})")
    if k > len(ok):
        raise PrepareError(
            f"clustering.k={k}: more clusters than decodable samples ({len(ok)}) in {uri!r}"
        )
    return ok, skipped


def _load_rows(embed_dir: str) -> tuple[Any, dict[str, Any]]:
    """Small columns of every embedded row, on the driver -> ``(ok rows, skipped summary)``.

    A key seen twice keeps its first copy in (key, url) order; the others count as skipped
    ``duplicate_key``.
    """
    table = read_parquet_columns(embed_dir, ["key", "url", "skip", "label", "sha", "prio"])
    df = table.to_pandas().sort_values(["key", "url"], kind="stable").reset_index(drop=True)
    bad = df[df["skip"] != ""]
    ok = df[df["skip"] == ""]
    dup = ok["key"].duplicated(keep="first")
    reasons = Counter(bad["skip"].tolist())
    if dup.any():
        reasons["duplicate_key"] += int(dup.sum())
    examples = bad[["key", "url", "skip"]].head(20).rename(columns={"skip": "reason"})
    skipped = {"reasons": dict(sorted(reasons.items())), "examples": examples.to_dict("records")}
    return ok[~dup].reset_index(drop=True), skipped


# --------------------------------------------------------------------------- fit and assign


def _fit(embed_dir: str, ok: Any, cl: ClusteringConfig,
         dim: int) -> tuple[dict[str, np.ndarray], int]:
    """Hierarchical k-means on at most ``fit_sample_cap`` samples -> (centroids, samples used).

    The sample is the rows with the smallest key priority, so it does not depend on row order,
    and only those rows' embeddings are read (parquet predicate pushdown).
    """
    import pyarrow.dataset as pads

    n_fit = min(cl.fit_sample_cap, len(ok))
    threshold = int(np.sort(ok["prio"].to_numpy())[n_fit - 1])
    fit = read_parquet_columns(
        embed_dir, ["key", "url", "embedding"],
        filter=(pads.field("skip") == "") & (pads.field("prio") <= threshold),
    ).to_pandas()
    fit = fit.merge(ok[["key", "url"]], on=["key", "url"]).sort_values("key", kind="stable")
    x_fit = np.stack(fit["embedding"].to_numpy()).astype(np.float32)
    log.info("prepare: k-means %d -> %d centroids on %d samples (dim %d)",
             min(cl.fine_centroids, len(x_fit)), cl.k, len(x_fit), dim)
    return fit_hierarchical_kmeans(x_fit, cl.k, cl.fine_centroids, cl.kmeans_iters,
                                   cl.seed), len(x_fit)


def _assign(embed_dir: str, ok: Any, centroids: np.ndarray, cfg: CampaignConfig) -> Any:
    """The assign pass, then the driver's plan of clusters, split and shards."""
    return _plan(ok, assign_pass(embed_dir, ok, centroids), cfg.clustering,
                 cfg.corpus.shard_size)


def _plan(ok: Any, dists: np.ndarray, cl: ClusteringConfig, shard_size: int) -> Any:
    """Each sample's cluster, distance, split, destination folder, position in it (a shuffled
    order fixed by ``clustering.seed``) and shard."""
    import pandas as pd

    cluster, distance = assign_clusters(dists, cl.balance_cap)
    counts = np.bincount(cluster, minlength=cl.k)
    if (counts == 0).any():
        raise PrepareError(
            f"clustering.k={cl.k}: cluster {int(np.flatnonzero(counts == 0)[0])} received no "
            "sample; lower clustering.k or set clustering.balance_cap"
        )
    held = heldout_mask(ok["key"].tolist(), cluster, cl.heldout_fraction, cl.seed)
    plan = ok.assign(cluster=cluster, distance=distance,
                     split=np.where(held, HELDOUT, "train"),
                     dest=np.where(held, HELDOUT, cluster.astype(str)))
    # shuffled order within each destination (a fixed permutation of the keys, from the seed):
    # a shard holds a sample of its whole cluster, not a run of neighbouring keys, and the
    # training stream mixes clusters' shards that look alike
    plan["rank"] = pd.util.hash_pandas_object(plan["key"], index=False,
                                              hash_key=f"hdd-ray-{cl.seed:08d}"[:16])
    plan = plan.sort_values(["dest", "rank", "key", "url"], kind="stable").reset_index(drop=True)
    plan = plan.drop(columns="rank")
    plan["pos"] = plan.groupby("dest").cumcount()
    plan["shard"] = plan["pos"] // shard_size
    plan["shard_path"] = [f"{d}/shard-{s:06d}.tar"
                          for d, s in zip(plan["dest"], plan["shard"], strict=True)]
    return plan


# --------------------------------------------------------------------------- write


def _write(cfg: CampaignConfig, clusters_dir: str, embed_dir: str, plan: Any,
           km: dict[str, np.ndarray], latent: bool = False, text: bool = False) -> dict[str, int]:
    """Replace the old outputs by the shards of ``plan``, the centroids and the assignments;
    the shards' bytes (:func:`hdd_ray.prepare.passes.write_pass`)."""
    # Old outputs go first, so a K that shrank leaves no stale cluster folders behind.
    for name in storage.listdir(clusters_dir):
        if name.isdigit() or name == HELDOUT or name in OUTPUT_FILES.values():
            storage.remove(storage.join(clusters_dir, name))
    sizes = write_pass(cfg, embed_dir, clusters_dir, plan, latent=latent, text=text)
    write_cluster_arrays(clusters_dir, km, plan)
    return sizes


# --------------------------------------------------------------------------- manifest


def _write_manifest(
    cfg: CampaignConfig, paths: CampaignPaths, inputs: _Inputs, *, dim: int,
    km: dict[str, np.ndarray], n_fit: int, plan: Any, skipped: dict[str, Any], started: float,
    vae: VaeInfo | None = None, text: dict[str, Any] | None = None,
) -> dict:
    """Montage, manifest, MLflow run; the manifest is written last (the stage is complete)."""
    corpus = cfg.corpus
    record = latent_record(vae, corpus.image_size) if vae is not None else None
    clusters = cluster_entries(plan, cfg.clustering.k, corpus.image_size, corpus.channels,
                               latents=record)
    decode = None
    if vae is not None:  # the montage shows decoded images
        def decode(z: np.ndarray) -> np.ndarray:
            import torch

            x = load_vae(vae).decode(torch.from_numpy(z.astype(np.float32)))
            return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) \
                .permute(0, 2, 3, 1).numpy()
    montage = write_montage(paths.clusters, clusters, decode=decode)
    manifest = build_manifest(
        cfg, fingerprint=inputs.fingerprint, uri=inputs.uri, shards=inputs.shards,
        dim=dim, km=km, n_fit=n_fit, plan=plan, skipped=skipped, clusters=clusters,
        started=started, latents=record,
    )
    if text is not None:
        manifest["text_features"] = text
    manifest["mlflow_run_id"] = None
    storage.write_json(paths.manifest, manifest)  # last: marks the stage complete
    log.info("prepare: wrote %s in %.1f s", paths.manifest, manifest["wall_s"])
    # MLflow after the manifest: an outage costs the run, never the prepared corpus
    run_id = _track_safely(cfg, manifest, montage)
    if run_id is not None:
        manifest["mlflow_run_id"] = run_id
        storage.write_json(paths.manifest, manifest)
    return {**manifest, "reused": False}


def _track_safely(cfg: CampaignConfig, manifest: dict[str, Any], montage: Any) -> str | None:
    """:func:`_track`, with a failure (MLflow unreachable) logged as one warning line."""
    try:
        return _track(cfg, manifest, montage)
    except Exception as exc:
        log.warning("prepare: MLflow logging failed (%s); the manifest is written",
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        return None


def _track(cfg: CampaignConfig, manifest: dict[str, Any], montage: Any) -> str | None:
    """MLflow run ``prepare``: settings, per-cluster counts, ARI, skipped, the montage."""
    from hdd_ray import tracking

    with tracking.run(cfg, "prepare", tags={"stage": "prepare"}) as active:
        if active is None:
            return None
        metrics = {f"count_cluster_{c}": n for c, n in enumerate(manifest["counts"])}
        metrics.update({f"heldout_cluster_{c}": n
                        for c, n in enumerate(manifest["heldout_counts"])})
        metrics.update(skipped=manifest["skipped"]["count"], num_samples=manifest["num_samples"],
                       wall_s=manifest["wall_s"])
        if manifest["ari_vs_labels"] is not None:
            metrics["ari_vs_labels"] = manifest["ari_vs_labels"]
        active.log(metrics, params=tracking.flatten({"corpus": to_dict(cfg.corpus),
                                                     "clustering": to_dict(cfg.clustering)}))
        active.log_image(montage, artifact_file="clusters_montage.png")
        active.log_dict(manifest, "manifest.json")
        return active.run_id


# --------------------------------------------------------------------------- fingerprints


def _embed_settings(cfg: CampaignConfig) -> dict[str, Any]:
    """What the embeddings depend on (weights and config files by identity, not name)."""
    cl = cfg.clustering
    weights = cl.embedder_weights
    if weights and os.path.isfile(weights):  # the file's identity, not only its name
        st = os.stat(weights)
        weights = [os.path.abspath(weights), st.st_size, st.st_mtime_ns]
    arch = cl.embedder_arch
    if arch and str(arch).endswith(".json") and os.path.isfile(arch):
        with open(arch, "rb") as f:
            arch = [arch, hashlib.sha256(f.read()).hexdigest()]
    vae = _vae(cfg)
    settings = {
        "image_key": cfg.corpus.image_key, "caption_key": cfg.corpus.caption_key,
        "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels,
        "embedder": cl.embedder, "arch": arch, "weights": weights,
        "embedder_image_size": cl.embedder_image_size,
        "pixel_size": cl.pixel_size if cl.embedder == "pixels" else None,
    }
    if cl.embedder == "open_clip" and cl.embedder_arch and cl.embedder_weights and \
            towers.needs_quick_gelu(str(cl.embedder_arch), str(cl.embedder_weights)):
        # Embeddings of OpenAI weights made before towers applied QuickGELU are not reused.
        settings["quick_gelu"] = True
    if vae is not None:  # latent space only: pixel-space fingerprints stay what they were
        settings["latents"] = identity_of(latent_record(vae, cfg.corpus.image_size))
    text = _text_features(cfg)
    if text is not None:  # a frozen tower's stored features: other fingerprints unchanged
        settings["text_features"] = text["identity"]
    return settings


def _kmeans_settings(cfg: CampaignConfig) -> dict[str, Any]:
    """What the clustering and the written shards depend on besides the embeddings."""
    cl = cfg.clustering
    return {
        "k": cl.k, "fine_centroids": cl.fine_centroids, "fit_sample_cap": cl.fit_sample_cap,
        "kmeans_iters": cl.kmeans_iters, "balance_cap": cl.balance_cap,
        "heldout_fraction": cl.heldout_fraction, "seed": cl.seed,
        "shard_size": cfg.corpus.shard_size, "shard_order": "shuffled",
    }
