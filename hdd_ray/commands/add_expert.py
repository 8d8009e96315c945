"""Add ONE expert to a finished campaign: new data becomes one more cluster, its expert is
trained (or contributed), and the router grows by one output.

    python jobs/add_expert.py --shards /data/new-cluster/ clustering.k=8        # a 9th cluster
    python jobs/add_expert.py --shards 's3://bucket/new/shard-{000..009}.tar' --objective ddpm_eps
    python jobs/add_expert.py --shards /data/sample/ --expert-dir /contrib/c-expert/  # contributed

``--shards`` are WebDataset shards as the corpus's (``corpus.image_key`` image, ``corpus.
caption_key`` caption, optional ``json``). They must not overlap the campaign's data (same keys
or same content are refused in one line). ``clustering.k`` is the campaign's newest cluster set;
afterwards the grown campaign is ``clustering.k=K+1`` (the job prints the overrides), and every
mixture of the K clusters before still loads with its ids. The new expert trains as any other
(``experts.*``, ``ray.executor``, preemptible); the router of K + 1 clusters is fine-tuned from
the K-cluster router (``router.grow``: steps, replay_samples; ``mode=scratch`` trains it anew).
With ``--expert-dir`` (a finished expert folder: ``weights.safetensors`` + ``expert.json``) the
shards are a sample of that expert's data: the cluster and the router are built from them and
the expert is installed, not trained; one trained at another resolution, or in another latent
space or VAE, is refused in one line. Re-running after a failure resumes (the cluster is added
once).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from hdd_ray.cli import parse_job_args

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig


def main(argv: list[str] | None = None) -> int:
    """Grow the campaign by one expert; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--shards", {"required": True, "help": "the new cluster's WebDataset shards (a folder, "
                                                "file, glob or brace pattern; local or a URI)"}),
        ("--objective", {"default": None, "choices": ["ddpm_eps", "fm_velocity"],
                         "help": "the new expert's objective (default: experts.objective)"}),
        ("--expert-dir", {"default": None,
                          "help": "a contributed expert's folder (weights.safetensors + "
                                  "expert.json): installed instead of trained"}),
    ])
    from hdd_ray.campaign import generations, load_manifest, model_shape, with_k
    from hdd_ray.corpus import list_shards
    from hdd_ray.errors import CampaignError, ConfigError, PrepareError
    from hdd_ray.placement import init_ray
    from hdd_ray.prepare.grow import (
        add_cluster,
        campaign_text_features,
        check_new_data,
        new_samples,
    )
    from hdd_ray.prepare.stage import fingerprint_of
    from hdd_ray.progress import format_table
    from hdd_ray.training.launcher import train_campaign
    from hdd_ray.training.memory import preflight

    try:  # everything that can be refused in one line, before Ray starts
        manifest = load_manifest(cfg)
        shards = list_shards(args.shards)
        k = cfg.clustering.k
        resume = _added_before(generations(load_manifest_raw(cfg)), shards, k)
        contributed = (_contributed(cfg, manifest, args.expert_dir) if args.expert_dir
                       else None)
        if resume is None:
            check_new_data(cfg, manifest, new_samples(cfg, shards))
        objective = (contributed or {}).get("objective") or args.objective \
            or cfg.experts.objective
        grown = _grown_config(with_k(cfg, (k if resume is None else resume) + 1), objective)
        new = grown.clustering.k - 1
        preflight(grown, model_shape(cfg, manifest), experts=[new], router=True)
        # the new cluster gets the campaign tower's features, which its expert trains from
        campaign_text_features(cfg, manifest)
        fingerprint = fingerprint_of(grown)
    except (CampaignError, ConfigError, PrepareError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg)
    if resume is None:
        source = {"source": "contributed", "expert": contributed} if contributed else \
            {"source": "shards"}
        view = add_cluster(cfg, shards, fingerprint, source)
        print(f"cluster {new} added: {view['counts'][new]} training, "
              f"{view['heldout_counts'][new]} held-out samples", flush=True)
    if args.expert_dir:
        _install(grown, args.expert_dir, new)
    statuses = train_campaign(grown, only=[new], include_router=True,
                              assignments=[sorted(grown.experts.ddpm_clusters)])
    print(format_table(statuses))
    print(f"\nthe grown campaign: clustering.k={grown.clustering.k} "
          f"experts.ddpm_clusters=[{','.join(map(str, grown.experts.ddpm_clusters))}]")
    return 0 if all(s.ok for s in statuses) else 1


def load_manifest_raw(cfg: CampaignConfig) -> dict[str, Any]:
    """The manifest as written (every generation), not a generation's view."""
    from hdd_ray import storage
    from hdd_ray.campaign import CampaignPaths

    return storage.read_json(CampaignPaths(cfg.root).manifest)


def _added_before(gens: list[dict[str, Any]], shards: list[str], k: int) -> int | None:
    """The K of the set these shards grew before (a re-run after a failure resumes it):
    the newest generation added them on top of ``k`` clusters, or ``k`` is that set's."""
    added = gens[-1].get("added") or {}
    if len(gens) > 1 and list(added.get("inputs") or []) == list(shards) \
            and int(added["cluster"]) + 1 == int(gens[-1]["k"]) and k in (
                int(gens[-1]["k"]), int(gens[-1]["k"]) - 1):
        return int(gens[-1]["k"]) - 1
    return None


def _grown_config(cfg: CampaignConfig, objective: str) -> CampaignConfig:
    """``cfg`` (already at K + 1 clusters) with the new cluster's objective."""
    import dataclasses

    new = cfg.clustering.k - 1
    ddpm = {c for c in cfg.experts.ddpm_clusters if c != new}
    if objective == "ddpm_eps":
        ddpm.add(new)
    return dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts,
                                                                ddpm_clusters=sorted(ddpm)))


def _contributed(cfg: CampaignConfig, manifest: dict[str, Any], directory: str) -> dict[str, Any]:
    """A contributed expert's record (weights by content, its id and objective), after the
    checks that refuse it in one line: not a finished expert, another resolution (the
    experts' input shape), another latent space or VAE."""
    from hdd_ray import storage
    from hdd_ray.campaign import EXPERT_JSON, WEIGHTS, file_sha256, model_shape, read_description
    from hdd_ray.errors import CampaignError
    from hdd_ray.latents import check_same_vae

    desc, problem = read_description(storage.join(directory, EXPERT_JSON))
    if desc is None or not storage.exists(storage.join(directory, WEIGHTS)):
        raise CampaignError(f"--expert-dir {directory}: not a finished expert "
                            f"({problem or 'no ' + WEIGHTS})")
    from hdd_ray.choices import OBJECTIVE_NAMES

    bad = [key for key in ("image_size", "channels") if not isinstance(desc.get(key), int)]
    if desc.get("objective") not in OBJECTIVE_NAMES:
        bad.append("objective")
    if bad:
        raise CampaignError(f"--expert-dir {directory}: its expert.json lacks a valid "
                            f"{', '.join(bad)}: refused")
    size, channels = model_shape(cfg, manifest)
    theirs = (int(desc["image_size"]), int(desc["channels"]))
    if theirs != (size, channels):
        raise CampaignError(f"--expert-dir {directory}: trained at {theirs[0]}x{theirs[0]} "
                            f"with {theirs[1]} channel(s), the campaign's experts see "
                            f"{size}x{size} with {channels}: refused")
    check_same_vae([("the campaign", manifest.get("latents")),
                    (f"--expert-dir {directory}", desc.get("latents"))], CampaignError,
                   message="{name} was trained against {other}, the campaign uses {first}: "
                           "refused")
    return {"sha256": desc.get("weights_sha256") or file_sha256(storage.join(directory, WEIGHTS)),
            "expert_id": str(desc.get("expert_id", "")), "objective": str(desc["objective"])}


def _install(cfg: CampaignConfig, directory: str, cluster: int) -> None:
    """Copy the contributed expert into the campaign as cluster ``cluster``'s expert: its
    weights as they are, its ``expert.json`` with the campaign's identity and id (the one it
    came with kept under ``contributed``), so the launcher reuses it."""
    from hdd_ray import storage
    from hdd_ray.campaign import (
        EXPERT_JSON,
        WEIGHTS,
        CampaignPaths,
        expert_id,
        expert_identity,
        load_manifest,
    )
    from hdd_ray.config import resolve_experts

    manifest = load_manifest(cfg)
    spec = resolve_experts(cfg)[cluster]
    eid = expert_id(cfg, spec, manifest)
    target = CampaignPaths(cfg.root).expert_dir(eid)
    if storage.exists(storage.join(target, EXPERT_JSON)):
        return
    desc = storage.read_json(storage.join(directory, EXPERT_JSON))
    storage.write_bytes(storage.join(target, WEIGHTS),
                        storage.read_bytes(storage.join(directory, WEIGHTS)))
    mine = {**desc, "expert_id": eid, "cluster": cluster,
            "identity": expert_identity(cfg, spec, manifest),
            "contributed": {"expert_id": desc.get("expert_id"), "from": directory,
                            "identity": desc.get("identity")}}
    storage.write_json(storage.join(target, EXPERT_JSON), mine)
    print(f"expert {eid}: contributed ({desc.get('expert_id')}), installed", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
