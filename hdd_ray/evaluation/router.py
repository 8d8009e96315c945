"""How well the router recognises each sample's cluster along the noise path."""

from __future__ import annotations

import torch

from hdd_ray import devices
from hdd_ray.campaign import heldout_shards, load_manifest, model_shape
from hdd_ray.config import CampaignConfig
from hdd_ray.models.expert import RouterModel, load_weights


@torch.no_grad()
def router_accuracy_by_t(model: RouterModel, cfg: CampaignConfig, bins: int = 10,
                         batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy of the router on the held-out split at ``t`` in the middle of each bin.

    The router sees ``x_t = (1 - t) x_0 + t eps`` (the flow-matching path, fixed noise seed) and
    must name the held-out sample's cluster; keys are the bins' mid-points (``"0.05"``, ...).
    The forward passes take ``batch_size`` samples at a time (the numbers do not depend on it:
    each bin's noise is drawn for the whole split on the CPU, then sliced).
    """
    from hdd_ray.diffusion import FM_TIME_SCALE
    from hdd_ray.samples import read_split

    manifest = load_manifest(cfg)
    shards = heldout_shards(cfg, manifest)
    if not shards:
        return {}
    # latent space: the router sees latents, as in training
    data = read_split(shards, manifest.get("latents"), cfg.corpus.image_size, cfg.corpus.channels)
    device = next(model.parameters()).device
    g = devices.generator(0)  # CPU: the same noise whatever the router's device
    model.eval()
    out = {}
    for i in range(bins):
        t = (i + 0.5) / bins
        eps = devices.randn(data.images.shape, g, "cpu")
        correct = 0
        for start in range(0, len(data), batch_size):
            x0 = data.images[start:start + batch_size].to(device)
            noise = eps[start:start + batch_size].to(device)
            tt = torch.full((x0.shape[0],), t, device=device)
            logits = model((1 - t) * x0 + t * noise, tt * FM_TIME_SCALE)
            labels = data.labels[start:start + batch_size].to(device)
            correct += int((logits.argmax(1) == labels).sum())
        out[f"{t:.2f}"] = correct / len(data)
    return out


def router_accuracy_of(cfg: CampaignConfig, weights_path: str,
                       use_gpu: bool = False) -> dict[str, float]:
    """:func:`router_accuracy_by_t` of the router exported at ``weights_path`` (safetensors),
    on the device :func:`hdd_ray.devices.pick_device` picks for ``use_gpu``."""
    manifest = load_manifest(cfg)
    size, channels = model_shape(cfg, manifest)
    model = RouterModel(cfg.router.model, size, channels, cfg.clustering.k)
    load_weights(model, weights_path, f"router {weights_path}")
    return router_accuracy_by_t(model.to(devices.pick_device(use_gpu)), cfg)


__all__ = ["router_accuracy_by_t", "router_accuracy_of"]
