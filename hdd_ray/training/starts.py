"""A run's start on its worker: the objective its expert trains (with the network it
predicts) and the checkpoint a new run loads before its first step.

The launcher resolves the start on the driver (:mod:`hdd_ray.campaign.starts`) and hands it
over in :attr:`RunSettings.start`; the worker checks the checkpoint's bytes against the content
hash the expert's id was computed from before loading it (a file replaced since is refused in
one line), so an expert is always what its id says.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from hdd_ray.campaign import file_sha256
from hdd_ray.diffusion import Objective, Safeguards, get_objective
from hdd_ray.errors import WeightsMismatch
from hdd_ray.training.settings import RunSettings

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

log = logging.getLogger(__name__)

__all__ = ["check_campaign_starts", "expert_objective", "grow_router", "load_start"]


def expert_objective(settings: RunSettings) -> Objective:
    """The expert's objective with the network it trains (its start's, else the objective's
    own) and, where the loss converts a VP network into a velocity, the conversion's settings."""
    spec = settings.expert
    if spec is None:
        raise ValueError("an expert run needs its expert (RunSettings.expert)")
    start = settings.start or {}
    conversion = start.get("conversion")
    return get_objective(spec.objective, spec.schedule, settings.train.timestep_sampling,
                         network=start.get("network"),
                         safeguards=Safeguards(**conversion) if conversion else None)


def load_start(model: nn.Module, settings: RunSettings) -> None:
    """Load the run's init into ``model`` (an expert, or the router) when it has one, after
    checking the file's SHA-256 against the one its id was computed from."""
    from hdd_ray.models.expert import load_weights
    from hdd_ray.models.pretrained import router_weights, start_expert, weights_file

    init = (settings.start or {}).get("init")
    if not init:
        return
    path = init["path"]
    if settings.kind == "router" and (settings.start or {}).get("grow_from"):
        grow_router(model, router_weights(path), int(settings.start["grow_from"]),
                    init.get("sha256"))
        log.info("router starts from %s (%d outputs, one more here)", path,
                 settings.start["grow_from"])
        return
    if settings.kind == "router":
        load_weights(model, router_weights(path), "router.init", sha256=init.get("sha256"))
        log.info("router starts from %s", path)
        return
    source = weights_file(path)
    actual = file_sha256(source)
    if init.get("sha256") and actual != init["sha256"]:
        raise WeightsMismatch(f"experts.init={path!r}: {source} changed since the launch "
                              f"(sha256 {actual[:12]}..., its id records "
                              f"{init['sha256'][:12]}...)")
    spec = settings.expert
    start_expert(model, path, spec.adaln, (settings.start or {}).get("mode", "exact"), spec.model)
    log.info("expert %d starts from %s (%s)", spec.cluster, path, init.get("format"))


def grow_router(model: nn.Module, path: str, k_old: int, sha256: str | None = None) -> None:
    """Load a router of ``k_old`` outputs into ``model`` (a router of more): every weight as
    it was, the head's new rows zero and their biases the mean of the old ones, so the grown
    router starts as the old one with the new clusters equally likely as an average old one."""
    import torch

    from hdd_ray.models.expert import load_weights

    head = model.net.head
    small = nn.Linear(head.in_features, k_old)
    model.net.head = small  # the old shape, to load the file with every check
    try:
        load_weights(model, path, "router.grow", sha256=sha256)
    finally:
        model.net.head = head
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:k_old] = small.weight
        head.bias[:k_old] = small.bias
        head.bias[k_old:] = small.bias.mean()


def check_campaign_starts(cfg: CampaignConfig) -> None:
    """Before Ray takes resources: every expert's init (under either objective, as sweeps
    train both) and ``router.init`` read (shapes only) and fitted to the networks they start,
    at the campaign's model shape (the manifest's, else the config's: the VAE's latent shape).
    One-line :class:`~hdd_ray.errors.ConfigError` naming the config key otherwise; nothing is
    read when no start is configured."""
    from dataclasses import replace

    from hdd_ray.campaign import check_starts
    from hdd_ray.config import resolve_experts
    from hdd_ray.config.pretrained import check_init_exists

    check_init_exists("experts.init", cfg.experts.init)
    for i, spec in enumerate(cfg.experts.list):
        check_init_exists(f"experts.list[{i}].init", spec.init)
    check_init_exists("router.init", cfg.router.init)
    k = cfg.clustering.k
    variants = [replace(cfg, experts=replace(cfg.experts, ddpm_clusters=ddpm))
                for ddpm in ([], list(range(k)))]
    experts = [e for v in variants for e in resolve_experts(v) if e.init is not None]
    if not experts and not cfg.router.init:
        return
    size, channels = _model_shape(cfg)
    for variant in variants:
        check_starts(variant, [e for e in resolve_experts(variant) if e.init is not None],
                     size, channels)


def _model_shape(cfg: CampaignConfig) -> tuple[int, int]:
    from hdd_ray.campaign import load_manifest, model_shape
    from hdd_ray.errors import CampaignError

    try:
        return model_shape(cfg, load_manifest(cfg))
    except (CampaignError, OSError, ValueError):
        pass
    if cfg.latents.vae:
        from hdd_ray.latents import vae_info

        c, size, _ = vae_info(cfg.latents, cfg.corpus.image_size, cfg.corpus.channels).shape(
            cfg.corpus.image_size)
        return size, c
    return cfg.corpus.image_size, cfg.corpus.channels
