"""The campaign directory: :class:`CampaignPaths` builds every path under one root (a local
path or a URI; the layout is ARCHITECTURE.md's "Campaign directory"), and the prepare stage's
manifest is read here, checked against the campaign (K, the latent space)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign.generations import generation_view, generations
from hdd_ray.errors import CampaignError, ConfigError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig


#: every fixed path of a campaign directory (ARCHITECTURE.md, "Campaign directory"): the
#: attribute of :class:`CampaignPaths` -> (the attribute it lies under, its name there)
LAYOUT: dict[str, tuple[str, str]] = {
    "corpus": ("root", "corpus"),  # input shards written by the demo corpus (or corpus.uri)
    "clusters": ("root", "clusters"),  # the prepare stage: centroids, assignments, shards
    "manifest": ("clusters", "manifest.json"),  # written last: the corpus is prepared
    "heldout": ("clusters", "heldout"),  # the held-out evaluation split
    "experts": ("root", "experts"),  # the Ray Train storage path of the expert runs
    "router": ("root", "router"),  # the Ray Train storage path of the router runs
    "students": ("root", "students"),  # dense students distilled from mixtures (jobs/distill.py)
    "mixtures": ("root", "mixtures"),  # evaluated mixtures and the comparison table
    "velocity_error": ("mixtures", "velocity_error"),  # evaluation/velocity_error.py's curves
    "sweeps": ("root", "sweeps"),  # the Ray Tune storage path of the sweeps
    "evaluation": ("root", "evaluation"),  # caches shared by every evaluation of the campaign
    "reference_stats": ("evaluation", "reference_stats"),  # FID reference statistics
    "reference_clip": ("evaluation", "reference_clip"),  # the demo's own reference CLIP
}


@dataclass(frozen=True)
class CampaignPaths:
    """Where each stage's outputs live under one campaign root (a local path or a URI).

    Every path of the campaign is built here: the fixed ones of :data:`LAYOUT` as attributes
    (``paths.manifest`` is ``<root>/clusters/manifest.json``), one run's or result's folder by
    the methods (``paths.expert_dir(expert_id)``).
    """

    root: str

    if TYPE_CHECKING:  # the attributes __getattr__ builds from LAYOUT, for type checkers
        corpus: str
        clusters: str
        manifest: str
        heldout: str
        experts: str
        router: str
        students: str
        mixtures: str
        velocity_error: str
        sweeps: str
        evaluation: str
        reference_stats: str
        reference_clip: str

    def __getattr__(self, name: str) -> str:
        """The path :data:`LAYOUT` names ``name`` (an :class:`AttributeError` for any other)."""
        if name not in LAYOUT:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        parent, segment = LAYOUT[name]
        return storage.join(getattr(self, parent), segment)

    def cluster_dir(self, k: int) -> str:
        """Per-cluster training shards ``clusters/<k>/``."""
        return storage.join(self.clusters, str(k))

    def expert_dir(self, expert_id: str) -> str:
        """One expert's storage (Ray Train run + final weights + expert.json)."""
        return storage.join(self.experts, expert_id)

    def router_dir(self, router_id: str) -> str:
        """One router's storage (Ray Train run + final weights + router.json)."""
        return storage.join(self.router, router_id)

    def student_dir(self, student_id: str) -> str:
        """One distilled student's storage (run + weights.safetensors + student.json)."""
        return storage.join(self.students, student_id)

    def mixture_dir(self, mixture_id: str) -> str:
        """One evaluated mixture: ``metrics.json`` and its sample grid."""
        return storage.join(self.mixtures, mixture_id)

    def sweep_dir(self, name: str) -> str:
        """One sweep: its Tune experiment, ranking, plot and ``best_mixture.json``."""
        return storage.join(self.sweeps, name)

    def local(self) -> str:
        """The root as an absolute local path (raises for object-store roots)."""
        if storage.is_uri(self.root):
            raise ValueError(f"root={self.root!r} is not a local path")
        return storage.resolve(self.root)[1]  # absolute, a file:// scheme stripped


def load_manifest(cfg: CampaignConfig) -> dict[str, Any]:
    """The clustering manifest as the generation of ``clustering.k`` clusters saw it
    (:func:`hdd_ray.campaign.generations.generation_view`: a campaign that grew keeps reading
    its older cluster sets); one line naming the fix when the corpus was not prepared or has no
    such generation."""
    paths = CampaignPaths(cfg.root)
    if not storage.exists(paths.manifest):
        raise CampaignError(
            f"no clusters at {paths.clusters}: run `python jobs/prepare_corpus.py root={cfg.root}` first"
        )
    try:
        manifest = storage.read_json(paths.manifest)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("clusters"), list):
            raise ValueError("not a manifest (no clusters list)")
        int(manifest.get("k", -1))
        generations(manifest)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise CampaignError(
            f"{paths.manifest} is corrupt ({str(exc).splitlines()[0][:120]}): run "
            f"`python jobs/prepare_corpus.py root={cfg.root}` (it prepares the corpus again)"
        ) from None
    view = generation_view(manifest, cfg.clustering.k)
    if view is None:
        have = ", ".join(str(g["k"]) for g in generations(manifest))
        raise CampaignError(
            f"clustering.k={cfg.clustering.k} but {paths.manifest} has k={have}: "
            "re-run prepare_corpus with --force or fix clustering.k"
        )
    _check_latents(cfg, view, paths.manifest)
    return view


def _check_latents(cfg: CampaignConfig, manifest: dict[str, Any], where: str) -> None:
    """Never mix: the campaign's ``latents`` settings must be the prepared corpus's (the VAE's
    content, scaling, shift and dtype: never its path; :func:`hdd_ray.latents.check_same_vae`)."""
    from hdd_ray.latents import SETTINGS_KEYS, check_same_vae, config_settings

    try:
        want = config_settings(cfg)
    except ConfigError as exc:
        raise CampaignError(str(exc)) from None
    now = f"latents.vae={cfg.latents.vae!r}" if want else "latents.vae=None (pixel space)"
    check_same_vae([(now, want), (where, manifest.get("latents"))], CampaignError,
                   keys=SETTINGS_KEYS,
                   message="{first_name} but {name} was prepared in {other}{differs}: re-run "
                           "prepare_corpus with --force, or set latents back")


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
