"""A manifest's generations: the cluster sets a campaign has had (ARCHITECTURE.md, "Campaign
directory").

Prepare writes one cluster set (generation 0: K clusters). Adding an expert
(:mod:`hdd_ray.prepare.grow`) appends a cluster and a generation of K + 1 clusters; the
clusters already there, their shards and their data hashes never change. Each generation
records its K, its clusters' data hashes, its held-out shards and its own ``data_hash``:
generation 0's is prepare's corpus-wide hash, a grown one's chains its parent's with the new
cluster's (:func:`grown_data_hash`). A campaign's ``clustering.k`` picks the generation it
reads (:func:`generation_view`): the manifest as that generation saw it, so every id computed
from it (experts, the router, mixtures) is the one it had before the campaign grew. A manifest
written before generations existed reads as its one generation, unchanged.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

__all__ = ["contributed_expert", "generation_view", "generations", "grown_data_hash",
           "parent_view"]


def generations(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's generations, oldest first: ``{"k", "data_hash", "clusters": [their
    data hashes], "heldout": {"count", "shards"}}`` (a grown one also ``"added"``: where its
    new cluster came from). A manifest without the field is one generation, read from its own
    fields."""
    recorded = manifest.get("generations")
    if recorded:
        if not isinstance(recorded, list) or not all(
                isinstance(g, dict) and isinstance(g.get("k"), int)
                and isinstance(g.get("clusters"), list) and isinstance(g.get("heldout"), dict)
                for g in recorded):
            raise ValueError("generations: each must have an integer k, a clusters list and "
                             "a heldout record")
        return list(recorded)
    k = manifest.get("k", len(manifest.get("clusters", [])))
    return [{"k": int(k), "data_hash": str(manifest.get("data_hash", "")),
             "clusters": [str(c.get("hash", "")) for c in manifest.get("clusters", [])],
             "heldout": dict(manifest.get("heldout") or {})}]


def grown_data_hash(parent_hash: str, cluster_hash: str) -> str:
    """The ``data_hash`` of a generation that adds a cluster of data hash ``cluster_hash``
    (its training and held-out samples) to a generation of data hash ``parent_hash``."""
    return hashlib.sha256(f"grown\n{parent_hash}\n{cluster_hash}\n".encode()).hexdigest()


def generation_view(manifest: dict[str, Any], k: int) -> dict[str, Any] | None:
    """The manifest as generation ``k`` (K clusters) saw it: its clusters, counts, held-out
    split and data hash, with ``"generation"`` its index; the manifest itself (the same
    object) when it has one generation and that is ``k``; None when no generation has K =
    ``k``."""
    gens = generations(manifest)
    index = next((i for i, g in enumerate(gens) if int(g["k"]) == int(k)), None)
    if index is None:
        return None
    if len(gens) == 1:
        return manifest
    gen = gens[index]
    view = copy.deepcopy(manifest)
    clusters = view["clusters"][:k]
    view.update(k=int(k), clusters=clusters, data_hash=str(gen["data_hash"]),
                heldout=dict(gen["heldout"]), generation=index,
                counts=[int(c["count"]) for c in clusters],
                heldout_counts=[int(c.get("heldout", 0)) for c in clusters],
                num_train=sum(int(c["count"]) for c in clusters),
                num_heldout=int(gen["heldout"].get("count", 0)))
    view["num_samples"] = view["num_train"] + view["num_heldout"]
    return view


def parent_view(view: dict[str, Any]) -> dict[str, Any] | None:
    """The generation before ``view``'s (a :func:`generation_view`), None for generation 0."""
    index = int(view.get("generation", 0))
    if index == 0 or not view.get("generations"):
        return None
    return generation_view(view, int(generations(view)[index - 1]["k"]))


def contributed_expert(manifest: dict[str, Any], cluster: int) -> dict[str, Any] | None:
    """The contributed expert a grown generation added with ``cluster`` (``{"sha256" of its
    weights, "expert_id" it had, "objective"}``), None when the cluster's expert is trained
    here (every cluster of prepare's, and those added as shards alone)."""
    for gen in generations(manifest)[1:]:
        added = gen.get("added") or {}
        if int(added.get("cluster", -1)) == int(cluster) and added.get("expert"):
            return dict(added["expert"])
    return None
