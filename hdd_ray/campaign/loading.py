"""Loading finished experts and the campaign's router for inference (their weights checked
against their description)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign.artifacts import EXPERT_JSON, ROUTER_JSON, WEIGHTS
from hdd_ray.campaign.directory import CampaignPaths, load_manifest
from hdd_ray.campaign.identity import model_shape, router_id
from hdd_ray.errors import CampaignError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.diffusion import Objective
    from hdd_ray.models.expert import ExpertModel, RouterModel


def load_expert(directory: str, text: dict[str, Any] | None = None,
                json_name: str = EXPERT_JSON) -> tuple[ExpertModel, dict[str, Any]]:
    """An exported expert (safetensors + expert.json), checked against its description.

    ``text``: the text encoder settings to build in place of the description's (a mixture
    folder's towers where they lie now); the description is returned as written.
    ``json_name``: ``student.json`` for a distilled student (a dense expert of every cluster)."""
    from hdd_ray.models.expert import ExpertModel, load_weights

    desc = storage.read_json(storage.join(directory, json_name))
    model = ExpertModel(desc["architecture"], text or desc["text"], desc["image_size"],
                        desc["channels"], adaln=desc.get("adaln") or "single")
    name = desc.get("expert_id") or desc.get("student_id")
    load_weights(model, storage.join(directory, WEIGHTS), f"expert {name}",
                 sha256=desc.get("weights_sha256"))  # in full: never the verified cache
    return model.eval(), desc


def expert_objective(desc: dict[str, Any]) -> Objective:
    """A finished expert's objective (``expert.json``'s ``objective`` and ``schedule``) with
    the network it predicts (``network``; experts exported before it was recorded: the
    objective's own), the one reader of how an expert becomes a velocity field."""
    from hdd_ray.diffusion import get_objective

    return get_objective(desc["objective"], desc.get("schedule"),
                         network=desc.get("network") or None)


def load_router(cfg: CampaignConfig, manifest: dict[str, Any] | None = None) -> RouterModel:
    """The campaign's trained router (one line naming the fix when it is missing)."""
    from hdd_ray.models.expert import RouterModel, load_weights

    manifest = manifest or load_manifest(cfg)
    rid = router_id(cfg, manifest)
    directory = CampaignPaths(cfg.root).router_dir(rid)
    if not storage.exists(storage.join(directory, ROUTER_JSON)):
        raise CampaignError(f"router {rid} not trained yet: run `python jobs/train_all_experts.py root={cfg.root}`")
    check_router_clusters(storage.read_json(storage.join(directory, ROUTER_JSON)), manifest, rid)
    size, channels = model_shape(cfg, manifest)
    model = RouterModel(cfg.router.model, size, channels, cfg.clustering.k)
    load_weights(model, storage.join(directory, WEIGHTS), f"router {rid}")
    return model.eval()


def check_router_clusters(desc: dict[str, Any], manifest: dict[str, Any], what: str) -> None:
    """Refuse (one line) a router whose cluster set (``router.json``: ``k``, ``data_hash`` and,
    since campaigns grow, its clusters' data hashes) is not the mixture's (``manifest``: the
    generation view the mixture reads)."""
    want = [str(c["hash"]) for c in manifest["clusters"]]
    have = desc.get("clusters")
    k = int(desc.get("k", len(want)))
    same = k == len(want) and str(desc.get("data_hash", manifest["data_hash"])) == str(
        manifest["data_hash"]) and (have is None or [str(h) for h in have] == want)
    if not same:
        raise CampaignError(
            f"{what} was trained on another cluster set ({k} clusters, data "
            f"{str(desc.get('data_hash'))[:12]}) than the mixture's ({len(want)} clusters, data "
            f"{str(manifest['data_hash'])[:12]}): train the router of this set "
            "(jobs/train_all_experts.py, or jobs/add_expert.py after growing)")
