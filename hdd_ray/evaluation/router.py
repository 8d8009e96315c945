"""How well the router recognises each sample's cluster along the noise path."""

from __future__ import annotations

import torch

from hdd_ray import devices
from hdd_ray.campaign import heldout_shards, load_manifest, model_shape
from hdd_ray.config import CampaignConfig
from hdd_ray.models.expert import RouterModel, load_weights

#: held-out samples the router's accuracy is measured on (the first ones of the split): the
#: standard error of an accuracy is then at most 0.8 points, at any corpus size
ACCURACY_SAMPLES = 4096
#: samples per forward pass (and per read: memory holds one batch of the split)
ACCURACY_BATCH = 256


@torch.no_grad()
def router_accuracy_by_t(model: RouterModel, cfg: CampaignConfig, bins: int = 10,
                         max_samples: int = ACCURACY_SAMPLES) -> dict[str, float]:
    """Top-1 accuracy of the router at ``t`` in the middle of each bin, on the first
    ``max_samples`` usable samples of the held-out split, read :data:`ACCURACY_BATCH` at a time.

    The router sees ``x_t = (1 - t) x_0 + t eps`` (the flow-matching path; each bin's noise from
    its own CPU generator, so the numbers do not depend on the router's device) and must name
    the held-out sample's cluster; keys are the bins' mid-points (``"0.05"``, ...).
    """
    from hdd_ray.diffusion import FM_TIME_SCALE
    from hdd_ray.samples import iter_split

    manifest = load_manifest(cfg)
    shards = heldout_shards(cfg, manifest)
    if not shards:
        return {}
    device = next(model.parameters()).device
    times = [(i + 0.5) / bins for i in range(bins)]
    gens = [devices.generator(i) for i in range(bins)]
    correct, seen = [0] * bins, 0
    model.eval()
    # latent space: the router sees latents, as in training
    for batch in iter_split(shards, manifest.get("latents"), cfg.corpus.image_size,
                            cfg.corpus.channels, ACCURACY_BATCH, limit=max_samples):
        x0, labels = batch.images.to(device), batch.labels.to(device)
        seen += len(batch)
        for i, t in enumerate(times):
            noise = devices.randn(tuple(batch.images.shape), gens[i], "cpu").to(device)
            tt = torch.full((x0.shape[0],), t, device=device)
            logits = model((1 - t) * x0 + t * noise, tt * FM_TIME_SCALE)
            correct[i] += int((logits.argmax(1) == labels).sum())
    return {f"{t:.2f}": c / seen for t, c in zip(times, correct, strict=True)}


def router_accuracy_of(cfg: CampaignConfig, weights_path: str,
                       use_gpu: bool = False) -> dict[str, float]:
    """:func:`router_accuracy_by_t` of the router exported at ``weights_path`` (safetensors),
    on the device :func:`hdd_ray.devices.pick_device` picks for ``use_gpu``."""
    manifest = load_manifest(cfg)
    size, channels = model_shape(cfg, manifest)
    model = RouterModel(cfg.router.model, size, channels, cfg.clustering.k)
    load_weights(model, weights_path, f"router {weights_path}")
    return router_accuracy_by_t(model.to(devices.pick_device(use_gpu)), cfg)


__all__ = ["ACCURACY_BATCH", "ACCURACY_SAMPLES", "router_accuracy_by_t", "router_accuracy_of"]
