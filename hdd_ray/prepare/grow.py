"""Growing a prepared campaign: new WebDataset shards become one more cluster (ARCHITECTURE.md,
"Campaign directory"; README, "Add or retire an expert").

:func:`check_new_data` reads the new shards on the driver (keys and content digests) and
refuses, in one line and before Ray starts, data that overlaps an existing cluster's (a key or a
sample digest already in the campaign). :func:`add_cluster` then, in one Ray task with the
prepare stage's embedding resources, decodes, embeds (the campaign's embedder) and, in latent
space, encodes the samples (:class:`hdd_ray.prepare.passes.EmbedBatch`, as prepare does), takes
the held-out split (``clustering.heldout_fraction``, the same rule as prepare's), writes
``clusters/<K>/`` and ``clusters/heldout/c<K>-shard-*.tar`` in a shuffled order fixed by
``clustering.seed``, records the samples in ``clusters/added/c<K>.parquet``, appends the
cluster's centroid (the mean embedding of its training samples) to ``centroids.npy`` and extends
the manifest by one generation (:mod:`hdd_ray.campaign.generations`). Nothing of the clusters
already there is touched.

:func:`replay_shards` writes the bounded replay sample an incremental router trains on.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths, generations, grown_data_hash
from hdd_ray.corpus import iter_samples, sample_digest, write_tar
from hdd_ray.errors import PrepareError
from hdd_ray.prepare.manifest import HELDOUT, OUTPUT_FILES, cluster_hash

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

__all__ = ["ADDED", "add_cluster", "campaign_text_features", "check_new_data", "replay_shards"]

log = logging.getLogger(__name__)

#: the folder (under ``clusters/``) recording each added cluster's samples (key, digest, split)
ADDED = "added"
#: the folder (under ``clusters/``) of the incremental routers' replay samples
REPLAY = "replay"


def new_samples(cfg: CampaignConfig, shards: list[str]) -> list[tuple[str, str]]:
    """``(key, content digest)`` of every readable sample of ``shards`` (first copy of a
    key); one line when there is none or an image or caption member is missing."""
    image_key, caption_key = cfg.corpus.image_key, cfg.corpus.caption_key
    out: dict[str, str] = {}
    for sample in iter_samples(shards, (image_key, caption_key)):
        if image_key not in sample or caption_key not in sample:
            have = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            raise PrepareError(f"new shards: sample {sample['__key__']!r} of {sample['__url__']} "
                               f"has no {image_key!r} or {caption_key!r} member (it has: {have})")
        out.setdefault(sample["__key__"], sample_digest(sample[image_key], sample[caption_key]))
    if not out:
        raise PrepareError(f"new shards {shards[:2]}: no readable sample")
    return list(out.items())


def _existing(paths: CampaignPaths) -> tuple[dict[str, int], dict[str, int]]:
    """Every sample already in the campaign: ``(key -> cluster, digest -> cluster)``."""
    from hdd_ray.prepare.passes import read_parquet_columns

    assigned = read_parquet_columns(storage.join(paths.clusters, OUTPUT_FILES["assignments"]),
                                    ["key", "cluster"]).to_pandas()
    cluster_of = dict(zip(assigned["key"], assigned["cluster"].astype(int), strict=True))
    embedded = read_parquet_columns(storage.join(paths.clusters, "embeddings"),
                                    ["key", "sha", "skip"]).to_pandas()
    embedded = embedded[(embedded["skip"] == "") & embedded["key"].isin(cluster_of)]
    by_sha = {sha: cluster_of[key] for key, sha in zip(embedded["key"], embedded["sha"],
                                                       strict=True)}
    added = storage.join(paths.clusters, ADDED)
    if storage.exists(added) and storage.listdir(added):
        extra = read_parquet_columns(added, ["key", "sha", "cluster"]).to_pandas()
        for key, sha, c in zip(extra["key"], extra["sha"], extra["cluster"], strict=True):
            cluster_of[key], by_sha[sha] = int(c), int(c)
    return cluster_of, by_sha


def check_new_data(cfg: CampaignConfig, manifest: dict[str, Any],
                   samples: list[tuple[str, str]]) -> None:
    """Refuse (one line) new data that overlaps an existing cluster: a sample key, or a
    sample's content (image and caption digest), already in the campaign; and a campaign
    whose ``clustering.k`` is not its newest cluster set (a campaign grows from its newest)."""
    newest = int(generations(manifest)[-1]["k"])
    if cfg.clustering.k != newest:
        raise PrepareError(f"clustering.k={cfg.clustering.k}: a campaign grows from its newest "
                           f"cluster set (k={newest}); set clustering.k={newest}")
    by_key, by_sha = _existing(CampaignPaths(cfg.root))
    for what, index, table in (("key", 0, by_key), ("content", 1, by_sha)):
        hits = [s for s in samples if s[index] in table]
        if hits:
            raise PrepareError(
                f"the new data overlaps cluster {table[hits[0][index]]}: {len(hits)} sample(s) "
                f"with the same {what} (e.g. {hits[0][0]!r}); remove them from the new shards")


def _embed_rows(cfg: CampaignConfig, shards: list[str], latents: Any,
                text: dict[str, Any] | None = None) -> Any:
    """The new shards embedded (and encoded, in latent space; their captions' features with
    the campaign's frozen text tower) as prepare's embed pass does: a pandas frame of its
    columns, skipped samples dropped, first copy of a key kept."""
    import pyarrow as pa

    from hdd_ray.prepare.passes import EmbedBatch

    cl, corpus = cfg.clustering, cfg.corpus
    spec = {"name": cl.embedder, "pixel_size": cl.pixel_size, "arch": cl.embedder_arch,
            "weights": cl.embedder_weights, "image_size": cl.embedder_image_size,
            "use_gpu": cl.gpus_per_actor > 0}
    embed = EmbedBatch(spec, corpus.channels, corpus.image_size, latents, text)
    tables, batch = [], []

    def flush() -> None:
        cols = {name: np.array([r[name] for r in batch], dtype=object)
                for name in ("key", "url", "image", "caption", "meta", "error")}
        tables.append(embed(cols))
        batch.clear()

    for s in iter_samples(shards, (corpus.image_key, corpus.caption_key, "json"),
                          include_damaged=True):
        batch.append({"key": s["__key__"], "url": s["__url__"], "image": s.get(corpus.image_key),
                      "caption": s.get(corpus.caption_key), "meta": s.get("json"),
                      "error": s.get("__error__", "")})
        if len(batch) >= cl.batch_size:
            flush()
    if batch:
        flush()
    rows = pa.concat_tables(tables).to_pandas()
    rows = rows[rows["skip"] == ""].sort_values(["key", "url"], kind="stable")
    return rows.drop_duplicates("key", keep="first").reset_index(drop=True)


def _plan(rows: Any, cluster: int, cfg: CampaignConfig) -> Any:
    """Each new sample's split and shard, in a shuffled order fixed by ``clustering.seed``
    (prepare's rule: :func:`hdd_ray.clustering.heldout_mask`, then a keyed hash order)."""
    import pandas as pd

    from hdd_ray.clustering import heldout_mask

    cl = cfg.clustering
    held = heldout_mask(rows["key"].tolist(), np.zeros(len(rows), np.int64),
                        cl.heldout_fraction, cl.seed)
    plan = rows.assign(split=np.where(held, HELDOUT, "train"))
    plan["rank"] = pd.util.hash_pandas_object(plan["key"], index=False,
                                              hash_key=f"hdd-ray-{cl.seed:08d}"[:16])
    plan = plan.sort_values(["split", "rank", "key"], kind="stable").drop(columns="rank")
    pos = plan.groupby("split").cumcount() // cfg.corpus.shard_size
    plan["shard_path"] = [f"{cluster}/shard-{s:06d}.tar" if split == "train"
                          else f"{HELDOUT}/c{cluster}-shard-{s:06d}.tar"
                          for split, s in zip(plan["split"], pos, strict=True)]
    return plan.reset_index(drop=True)


def _write_shards(clusters_dir: str, plan: Any, cluster: int, latent: bool,
                  text: bool = False) -> None:
    """One tar per planned shard, samples in the plan's order (prepare's sample layout)."""
    from hdd_ray.latents import LATENT_MEMBER
    from hdd_ray.models.text_features import TEXT_MEMBER

    for shard_path, group in plan.groupby("shard_path", sort=True):
        samples = []
        for row in group.itertuples(index=False):
            meta = json.loads(row.meta)
            meta["cluster"] = cluster
            sample = {"__key__": row.key, "txt": row.caption,
                      "json": json.dumps(meta, sort_keys=True)}
            if latent:
                sample[LATENT_MEMBER] = bytes(row.latent)
            else:
                sample["png"] = bytes(row.png)
            if text:
                sample[TEXT_MEMBER] = bytes(row.text)
            samples.append(sample)
        write_tar(storage.join(clusters_dir, shard_path), samples)


def _add_cluster_task(cfg: CampaignConfig, shards: list[str], cluster: int,
                      latents: Any, text: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Ray task: embed, plan and write the new cluster; its record for the manifest."""
    paths = CampaignPaths(cfg.root)
    rows = _embed_rows(cfg, shards, latents, text)
    if len(rows) < 2:
        raise PrepareError(f"new shards: {len(rows)} decodable sample(s); a cluster needs 2")
    plan = _plan(rows, cluster, cfg)
    storage.remove(paths.cluster_dir(cluster))
    _write_shards(paths.clusters, plan, cluster, latent=latents is not None,
                  text=text is not None)
    train = plan[plan["split"] == "train"]
    emb = np.stack(train["embedding"].to_numpy()).astype(np.float32)
    record = _record_samples(paths, plan, cluster)
    small = ["key", "sha", "split", "shard_path"]  # the bytes stay on the worker
    return {"cluster": cluster, "centroid": emb.mean(axis=0), "train": train[small],
            "plan": plan[small], "record": record}


def _record_samples(paths: CampaignPaths, plan: Any, cluster: int) -> str:
    """``clusters/added/c<K>.parquet``: key, digest, split (what later overlap checks read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": plan["key"].tolist(), "sha": plan["sha"].tolist(),
                      "split": plan["split"].tolist(), "cluster": [cluster] * len(plan)})
    path = storage.join(paths.clusters, ADDED, f"c{cluster}.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(path, buf.getvalue())
    return path


def add_cluster(cfg: CampaignConfig, shards: list[str], fingerprint: str | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add ``shards`` to the campaign as cluster K (``cfg.clustering.k`` = its newest set);
    returns the manifest's new generation view (K + 1 clusters). Ray must be initialised.

    ``fingerprint``: what prepare computes for the grown set's settings (its reuse check);
    ``source``: how the cluster came (recorded in the generation's ``added``)."""
    import ray

    from hdd_ray.campaign import generation_view, load_manifest
    from hdd_ray.latents import vae_info

    manifest = load_manifest(cfg)
    paths = CampaignPaths(cfg.root)
    raw = storage.read_json(paths.manifest)
    k = cfg.clustering.k
    latents = vae_info(cfg.latents, cfg.corpus.image_size, cfg.corpus.channels) \
        if cfg.latents.vae else None
    text = campaign_text_features(cfg, manifest)
    started = time.time()
    task = ray.remote(num_cpus=1, num_gpus=cfg.clustering.gpus_per_actor)(_add_cluster_task)
    out = ray.get(task.remote(cfg, list(shards), k, latents, text))
    plan, train = out["plan"], out["train"]
    lat = manifest.get("latents")
    size, ch = cfg.corpus.image_size, cfg.corpus.channels
    held = plan[plan["split"] == HELDOUT]
    entry = {"cluster": k, "count": len(train), "heldout": len(held),
             "shards": sorted(set(train["shard_path"])),
             "hash": cluster_hash(train["key"].tolist(), train["sha"].tolist(), size, ch, lat)}
    _append_centroid(paths, out["centroid"])
    last = generations(raw)[-1]
    heldout = {"count": int(last["heldout"].get("count", 0)) + len(held),
               "shards": [*last["heldout"].get("shards", []), *sorted(set(held["shard_path"]))]}
    gen = {"k": k + 1, "clusters": [*last["clusters"], entry["hash"]], "heldout": heldout,
           "data_hash": grown_data_hash(str(last["data_hash"]), cluster_hash(
               plan["key"].tolist(), plan["sha"].tolist(), size, ch, lat)),
           "fingerprint": fingerprint,
           "added": {"cluster": k, "inputs": list(shards), "samples": out["record"],
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "wall_s": round(time.time() - started, 2), **(source or {})}}
    raw = {**raw, "generations": [*generations(raw), gen], "k": k + 1,
           "clusters": [*raw["clusters"][:k], entry], "data_hash": gen["data_hash"],
           "heldout": heldout}
    raw["counts"] = [int(c["count"]) for c in raw["clusters"]]
    raw["heldout_counts"] = [int(c.get("heldout", 0)) for c in raw["clusters"]]
    raw["num_train"], raw["num_heldout"] = sum(raw["counts"]), heldout["count"]
    raw["num_samples"] = raw["num_train"] + raw["num_heldout"]
    storage.write_json(paths.manifest, raw)  # last: the grown set exists
    log.info("grow: cluster %d added (%d training, %d held-out samples)", k, len(train),
             len(held))
    view = generation_view(raw, k + 1)
    assert view is not None
    return view


def campaign_text_features(cfg: CampaignConfig, manifest: dict[str, Any]
                            ) -> dict[str, Any] | None:
    """The campaign's ``text_features`` record, which the new cluster's samples get too; a
    config whose frozen text tower is not the one the campaign was prepared with is refused
    in one line (the features are never mixed)."""
    from hdd_ray.campaign import text_features_record
    from hdd_ray.config import to_dict

    have = manifest.get("text_features")
    try:
        want = text_features_record(to_dict(cfg.experts.text))
    except (ValueError, OSError) as exc:
        raise PrepareError(str(exc).splitlines()[0]) from None
    if (want or {}).get("identity") != (have or {}).get("identity"):
        def name(rec: dict[str, Any] | None) -> str:
            return f"{rec['arch']} ({rec['pretrained']})" if rec else "no stored text features"
        raise PrepareError(f"experts.text: {name(want)}, but the campaign was prepared with "
                           f"{name(have)}: set experts.text back, or prepare the campaign again")
    return have


def _append_centroid(paths: CampaignPaths, centroid: np.ndarray) -> None:
    """``centroids.npy`` with the new cluster's centroid as its last row."""
    path = storage.join(paths.clusters, OUTPUT_FILES["centroids"])
    old = np.load(io.BytesIO(storage.read_bytes(path)))
    buf = io.BytesIO()
    np.save(buf, np.concatenate([old, centroid[None].astype(old.dtype)]))
    storage.write_bytes(path, buf.getvalue())


def replay_shards(cfg: CampaignConfig, parent: dict[str, Any],
                  samples: int) -> dict[int, tuple[list[str], int]]:
    """The old clusters' replay sample of an incremental router: ``cluster -> (shards,
    count)``, at most ``samples`` training samples of the ``parent`` generation's clusters, each
    cluster in proportion to its size (the first of its shuffled shards), written once under
    ``clusters/replay/<parent data hash>-<samples>/``. With room for all, the clusters' own
    shards."""
    paths = CampaignPaths(cfg.root)
    counts = [int(c["count"]) for c in parent["clusters"]]
    total = sum(counts)
    if samples >= total:
        return {c: ([storage.join(paths.clusters, s) for s in entry["shards"]], counts[c])
                for c, entry in enumerate(parent["clusters"])}
    quota = [max(1, int(round(samples * n / total))) for n in counts]
    folder = storage.join(paths.clusters, REPLAY, f"{str(parent['data_hash'])[:16]}-{samples}")
    out: dict[int, tuple[list[str], int]] = {}
    for c, entry in enumerate(parent["clusters"]):
        path = storage.join(folder, f"c{c}.tar")
        if not storage.exists(path):
            taken = []
            for s in iter_samples([storage.join(paths.clusters, r) for r in entry["shards"]]):
                taken.append({k: v for k, v in s.items() if k != "__url__"})
                if len(taken) >= quota[c]:
                    break
            write_tar(path, taken)
        out[c] = ([path], quota[c])
    return out
