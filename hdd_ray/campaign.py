"""The campaign layer: its directory, its manifest, the ids of its experts and router, its
objective assignments, and loading finished experts and the router for inference.

Training, the ensemble, evaluation and sweeps all read the campaign through this module; none of
them needs the training launcher to find an expert (ARCHITECTURE.md describes the layers and the
campaign directory layout).

Ids are deterministic: an expert's id hashes everything that determines its weights (its
*identity*: cluster, objective, schedule, model, text encoder, training settings, its cluster's
data hash, image size and channels), never where or how fast it runs. A finished expert (valid
``weights.safetensors`` + ``expert.json``) is therefore reused by any campaign that asks for the
same identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.config import CampaignConfig, ResolvedExpert, to_dict
from hdd_ray.errors import CampaignError, ConfigError, ExpertRejected

if TYPE_CHECKING:
    from hdd_ray.training.model import ExpertModel, RouterModel

WEIGHTS = "weights.safetensors"
EXPERT_JSON = "expert.json"
ROUTER_JSON = "router.json"

#: training settings that change neither an expert's nor the router's weights, so they are left
#: out of identities: changing them keeps the cached run
NON_IDENTITY_TRAIN_KEYS = ("checkpoint_every", "compile")

#: letters of an objective assignment string ("D F F D"): cluster uses ddpm_eps / the base
ASSIGNMENT_LETTERS = {"D": "ddpm_eps", "F": "fm_velocity"}


# ------------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class CampaignPaths:
    """Where each stage's outputs live under one campaign root (a local path or a URI).

    The layout is described in ARCHITECTURE.md; every path of the campaign is built here.
    """

    root: str

    @property
    def corpus(self) -> str:
        """Input shards written by the demo corpus (or ``corpus.uri``)."""
        return storage.join(self.root, "corpus")

    @property
    def clusters(self) -> str:
        """Clustering outputs: manifest, centroids, assignments, per-cluster shards."""
        return storage.join(self.root, "clusters")

    @property
    def manifest(self) -> str:
        """``clusters/manifest.json``."""
        return storage.join(self.clusters, "manifest.json")

    def cluster_dir(self, k: int) -> str:
        """Per-cluster training shards ``clusters/<k>/``."""
        return storage.join(self.clusters, str(k))

    @property
    def heldout(self) -> str:
        """Held-out evaluation split ``clusters/heldout/``."""
        return storage.join(self.clusters, "heldout")

    @property
    def experts(self) -> str:
        """All experts' storage (the Ray Train storage path of the expert runs)."""
        return storage.join(self.root, "experts")

    def expert_dir(self, expert_id: str) -> str:
        """One expert's storage (Ray Train run + final weights + expert.json)."""
        return storage.join(self.experts, expert_id)

    @property
    def router(self) -> str:
        """The routers' storage (the Ray Train storage path of the router runs)."""
        return storage.join(self.root, "router")

    def router_dir(self, router_id: str) -> str:
        """One router's storage (Ray Train run + final weights + router.json)."""
        return storage.join(self.router, router_id)

    @property
    def mixtures(self) -> str:
        """Evaluated mixtures (and the comparison table)."""
        return storage.join(self.root, "mixtures")

    def mixture_dir(self, mixture_id: str) -> str:
        """One evaluated mixture: ``metrics.json`` and its sample grid."""
        return storage.join(self.mixtures, mixture_id)

    @property
    def velocity_error(self) -> str:
        """Per-t velocity-error curves of the experts (``evaluation/velocity_error.py``)."""
        return storage.join(self.mixtures, "velocity_error")

    @property
    def sweeps(self) -> str:
        """Sweeps of objective assignments (the Ray Tune storage path)."""
        return storage.join(self.root, "sweeps")

    def sweep_dir(self, name: str) -> str:
        """One sweep: its Tune experiment, ranking, plot and ``best_mixture.json``."""
        return storage.join(self.sweeps, name)

    @property
    def evaluation(self) -> str:
        """Caches shared by every evaluation of the campaign."""
        return storage.join(self.root, "evaluation")

    @property
    def reference_stats(self) -> str:
        """Cached FID reference statistics, keyed by data hash and extractor."""
        return storage.join(self.evaluation, "reference_stats")

    @property
    def reference_clip(self) -> str:
        """The demo's own reference CLIP (weights + ``reference_clip.json``)."""
        return storage.join(self.evaluation, "reference_clip")

    def local(self) -> str:
        """The root as an absolute local path (raises for object-store roots)."""
        if storage.is_uri(self.root):
            raise ValueError(f"root={self.root!r} is not a local path")
        return os.path.abspath(self.root)


# -------------------------------------------------------------------------------- the manifest


def load_manifest(cfg: CampaignConfig) -> dict[str, Any]:
    """The clustering manifest; one line naming the fix when the corpus was not prepared."""
    paths = CampaignPaths(cfg.root)
    if not storage.exists(paths.manifest):
        raise CampaignError(
            f"no clusters at {paths.clusters}: run `python jobs/prepare_corpus.py root={cfg.root}` first"
        )
    manifest = storage.read_json(paths.manifest)
    if int(manifest.get("k", -1)) != cfg.clustering.k:
        raise CampaignError(
            f"clustering.k={cfg.clustering.k} but {paths.manifest} has k={manifest.get('k')}: "
            "re-run prepare_corpus with --force or fix clustering.k"
        )
    return manifest


def cluster_info(manifest: dict[str, Any], cluster: int) -> dict[str, Any]:
    """The manifest's entry of one cluster: ``count``, ``hash`` (of its data), ``shards``."""
    for entry in manifest.get("clusters", []):
        if int(entry["cluster"]) == cluster:
            return entry
    return {"cluster": cluster, "count": 0, "hash": "", "shards": []}


def cluster_shards(cfg: CampaignConfig, manifest: dict[str, Any], cluster: int) -> list[str]:
    """Full paths of a cluster's training shards."""
    clusters_dir = CampaignPaths(cfg.root).clusters
    return [storage.join(clusters_dir, s) for s in cluster_info(manifest, cluster)["shards"]]


def heldout_shards(cfg: CampaignConfig, manifest: dict[str, Any] | None = None) -> list[str]:
    """Full paths of the held-out evaluation split's shards."""
    manifest = manifest or load_manifest(cfg)
    clusters_dir = CampaignPaths(cfg.root).clusters
    return [storage.join(clusters_dir, s) for s in manifest.get("heldout", {}).get("shards", [])]


# ------------------------------------------------------------------------- identities and ids


def short_hash(obj: Any, n: int = 10) -> str:
    """The first ``n`` hex digits (64: all) of sha256 over ``obj`` as JSON with sorted keys.

    Every id of the campaign (experts, router, mixtures) is a readable prefix plus this hash of
    what defines the thing, so equal definitions get equal ids across runs and machines. Values
    JSON cannot write (paths, numpy scalars) are written as ``str(value)``.
    """
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _identity_train(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k not in NON_IDENTITY_TRAIN_KEYS}


def expert_identity(cfg: CampaignConfig, expert: ResolvedExpert,
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the expert's weights (resources excluded).

    The data hash is its own cluster's, so re-clustering that leaves a cluster unchanged keeps
    its expert.
    """
    return {
        "cluster": expert.cluster,
        "objective": expert.objective,
        "schedule": expert.schedule,
        "model": expert.model,
        "text": expert.text,
        "train": _identity_train(expert.train),
        "data_hash": str(cluster_info(manifest, expert.cluster)["hash"]),
        "image_size": cfg.corpus.image_size,
        "channels": cfg.corpus.channels,
    }


def expert_id(cfg: CampaignConfig, expert: ResolvedExpert, manifest: dict[str, Any]) -> str:
    """Deterministic id of an expert in this campaign, e.g. ``c1-ddpm-<hash of its identity>``."""
    tag = "ddpm" if expert.objective == "ddpm_eps" else "fm"
    return f"c{expert.cluster}-{tag}-{short_hash(expert_identity(cfg, expert, manifest))}"


def router_identity(cfg: CampaignConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What determines the router's weights."""
    return {"model": cfg.router.model, "train": _identity_train(to_dict(cfg.router.train)),
            "k": cfg.clustering.k, "data_hash": str(manifest["data_hash"]),
            "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels}


def router_id(cfg: CampaignConfig, manifest: dict[str, Any]) -> str:
    """Deterministic id of the campaign's router."""
    return "router-" + short_hash(router_identity(cfg, manifest))


# ----------------------------------------------------------------------- objective assignments


def parse_assignment(text: str, k: int, key: str = "assignment") -> list[int]:
    """``"D F F D"`` (or ``"DFFD"``, or objective names) -> the clusters using ``ddpm_eps``.

    One letter (or objective name) per cluster: ``D`` = ``ddpm_eps``, ``F`` = ``fm_velocity``.
    Raises :class:`ConfigError` naming ``key`` on an unknown objective or a wrong length.
    """
    tokens = text.replace(",", " ").split()
    if len(tokens) == 1 and len(tokens[0]) > 1 and tokens[0] not in ASSIGNMENT_LETTERS.values():
        tokens = list(tokens[0])
    names = {**ASSIGNMENT_LETTERS, **{o: o for o in ASSIGNMENT_LETTERS.values()}}
    for c, tok in enumerate(tokens):
        if tok not in names:
            raise ConfigError(f"{key}={text!r}: unknown objective {tok!r} for cluster {c}, "
                              "allowed: D (ddpm_eps), F (fm_velocity)")
    if len(tokens) != k:
        raise ConfigError(f"{key}={text!r}: {len(tokens)} objectives, expected one per cluster "
                          f"(clustering.k={k})")
    return [c for c, tok in enumerate(tokens) if names[tok] == "ddpm_eps"]


def format_assignment(ddpm_clusters: Iterable[int], k: int) -> str:
    """The readable objective per cluster, e.g. ``D F F D F F F F`` (inverse of
    :func:`parse_assignment`)."""
    ddpm = set(ddpm_clusters)
    return " ".join("D" if c in ddpm else "F" for c in range(k))


def with_assignment(cfg: CampaignConfig, ddpm_clusters: Iterable[int],
                    schedule: str | None = None) -> CampaignConfig:
    """The same campaign with another objective assignment (and DDPM schedule, when given)."""
    experts = dataclasses.replace(cfg.experts, ddpm_clusters=sorted(ddpm_clusters))
    if schedule is not None:
        experts = dataclasses.replace(experts, schedule=schedule)
    return dataclasses.replace(cfg, experts=experts)


def campaign_assignments(cfg: CampaignConfig) -> list[list[int]]:
    """The objective assignments the campaign needs: its own, plus the evaluation baseline."""
    out = [sorted(cfg.experts.ddpm_clusters)]
    base = cfg.evaluation.baseline_ddpm_clusters
    if cfg.evaluation.enabled and base is not None and sorted(base) not in out:
        out.append(sorted(base))
    return out


# ------------------------------------------------------------------- finished experts, router


def check_existing(directory: str, identity: dict[str, Any], json_name: str) -> str:
    """``"finished"``, ``"partial"`` (checkpoints only) or ``"missing"``.

    Raises :class:`ExpertRejected` when ``json_name`` describes a different model.
    """
    desc_path = storage.join(directory, json_name)
    if storage.exists(desc_path) and storage.exists(storage.join(directory, WEIGHTS)):
        desc = storage.read_json(desc_path)
        diffs = [f"{k}: {desc.get('identity', {}).get(k)!r} here vs {v!r} in the campaign"
                 for k, v in identity.items() if desc.get("identity", {}).get(k) != v]
        if diffs:
            raise ExpertRejected(f"{directory} does not match the campaign ({'; '.join(diffs[:3])})")
        return "finished"
    if any(n.startswith("checkpoint_") for n in storage.listdir(directory)):
        return "partial"
    return "missing"


def load_expert(directory: str) -> tuple[ExpertModel, dict[str, Any]]:
    """An exported expert (safetensors + expert.json), checked against its description."""
    from hdd_ray.training.model import ExpertModel, load_weights

    desc = storage.read_json(storage.join(directory, EXPERT_JSON))
    model = ExpertModel(desc["architecture"], desc["text"], desc["image_size"], desc["channels"])
    load_weights(model, storage.join(directory, WEIGHTS), f"expert {desc['expert_id']}")
    return model.eval(), desc


def load_router(cfg: CampaignConfig, manifest: dict[str, Any] | None = None) -> RouterModel:
    """The campaign's trained router (one line naming the fix when it is missing)."""
    from hdd_ray.training.model import RouterModel, load_weights

    manifest = manifest or load_manifest(cfg)
    rid = router_id(cfg, manifest)
    directory = CampaignPaths(cfg.root).router_dir(rid)
    if not storage.exists(storage.join(directory, ROUTER_JSON)):
        raise CampaignError(f"router {rid} not trained yet: run `python jobs/train_all_experts.py root={cfg.root}`")
    model = RouterModel(cfg.router.model, cfg.corpus.image_size, cfg.corpus.channels, cfg.clustering.k)
    load_weights(model, storage.join(directory, WEIGHTS), f"router {rid}")
    return model.eval()


__all__ = [
    "ASSIGNMENT_LETTERS", "EXPERT_JSON", "NON_IDENTITY_TRAIN_KEYS", "ROUTER_JSON", "WEIGHTS",
    "CampaignPaths", "campaign_assignments", "check_existing", "cluster_info", "cluster_shards",
    "expert_id", "expert_identity", "format_assignment", "heldout_shards", "load_expert",
    "load_manifest", "load_router", "parse_assignment", "router_id", "router_identity",
    "short_hash", "with_assignment",
]
