"""A finished expert's sample grid: what it makes of a few captions of its own cluster.

The launcher logs one per expert to the expert's MLflow run (``samples.png``, also written to
``experts/<id>/samples.png``). It samples with the expert **alone** (no router, no other
expert), converted to a flow-matching velocity like in a mixture, with the campaign's guidance,
sampler and conversion settings, from a few prompts (distinct captions of the first samples of
its cluster's first shard), few images and few steps (:data:`GRID_PROMPTS`,
:data:`GRID_PER_PROMPT`, :data:`GRID_STEPS`), decoded by :func:`hdd_ray.latents.to_pixels`.
An expert trained on CPUs is sampled in the driver (tiny models: milliseconds to seconds); one
trained on GPUs is sampled in a Ray task with its own resources (one worker's), so a CPU head
node never runs a large network.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from hdd_ray import storage

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.models.expert import ExpertModel

log = logging.getLogger(__name__)

GRID_PROMPTS = 4  # distinct captions
GRID_PER_PROMPT = 4  # images per caption
GRID_STEPS = 16  # ODE steps at most (sampling.steps when lower)
GRID_FILE = "samples.png"
GRID_TIMEOUT_S = 600.0  # a GPU grid task waiting longer (no free GPU, a hung node) is cancelled

__all__ = ["GRID_FILE", "GRID_TIMEOUT_S", "cluster_prompts", "expert_grid", "expert_grid_png",
           "sample_expert", "wait_or_cancel"]


def cluster_prompts(shards: list[str], n: int = GRID_PROMPTS, caption_key: str = "txt",
                    max_samples: int = 256) -> list[str]:
    """Up to ``n`` distinct captions among the first ``max_samples`` samples of ``shards``
    (streamed: only the start of the first shard is read)."""
    from hdd_ray.corpus import iter_samples

    found: list[str] = []
    seen = 0
    for sample in iter_samples(shards[:1], suffixes=(caption_key,)):
        seen += 1
        text = sample.get(caption_key, b"").decode("utf-8", "replace").strip()
        if text and text not in found:
            found.append(text)
        if len(found) >= n or seen >= max_samples:
            break
    return found


@torch.no_grad()
def sample_expert(cfg: CampaignConfig, model: ExpertModel, desc: dict[str, Any], prompts: list[str],
                  steps: int | None = None, seed: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """One image per prompt from ``model`` alone (an :class:`ExpertModel` described by its
    ``expert.json`` fields ``desc``), decoded to pixels in [-1, 1], on the CPU."""
    from hdd_ray import devices
    from hdd_ray.campaign import expert_objective
    from hdd_ray.diffusion import Safeguards, guided, sample_ode
    from hdd_ray.latents import to_pixels

    s = cfg.sampling
    device = torch.device(device)
    model = model.to(device).eval()
    objective = expert_objective(desc)
    safeguards = Safeguards(**dataclasses.asdict(s.conversion))
    tok = model.tokenize(prompts, device)
    tokens = model.encode_text(tok["ids"], tok["mask"])
    prior = model.prior_mean()
    field = guided(objective.velocity_field(model, safeguards, prior), s.guidance_scale)
    c, size = int(desc["channels"]), int(desc["image_size"])
    noise = devices.randn((len(prompts), c, size, size), devices.generator(seed), device)
    x = sample_ode(field, noise, {"tokens": tokens, "mask": tok["mask"]},
                   steps=steps or min(s.steps, GRID_STEPS), sampler=s.sampler,
                   shift=getattr(s, "time_shift", 1.0))
    return to_pixels(cfg, x).clamp(-1, 1).float().cpu()


def expert_grid_png(cfg: CampaignConfig, expert_dir: str, prompts: list[str],
                    per_prompt: int = GRID_PER_PROMPT, use_gpu: bool = False) -> bytes:
    """Load the exported expert in ``expert_dir``, sample ``per_prompt`` images per prompt,
    write ``<expert_dir>/samples.png``; returns the PNG bytes."""
    from hdd_ray.campaign import load_expert
    from hdd_ray.devices import pick_device
    from hdd_ray.evaluation.grids import save_grid

    model, desc = load_expert(expert_dir)
    repeated = [p for p in prompts for _ in range(per_prompt)]
    images = sample_expert(cfg, model, desc, repeated, device=pick_device(use_gpu))
    return save_grid(storage.join(expert_dir, GRID_FILE), images, repeated,
                     per_row=per_prompt, max_pages=1)[0]


def expert_grid(cfg: CampaignConfig, expert_dir: str, shards: list[str],
                resources: dict[str, Any], timeout_s: float = GRID_TIMEOUT_S) -> bytes | None:
    """The grid of a finished expert (PNG bytes), or ``None`` when its cluster has no caption.

    In this process when the expert trained on CPUs; otherwise in a Ray task with one worker's
    resources (GPUs, accelerator type, custom resources), so the driver never runs it. The
    grid is optional: a task not done within ``timeout_s`` is cancelled and ``None`` returned
    with one warning line (:func:`wait_or_cancel`), so it never blocks the campaign.
    """
    prompts = cluster_prompts(shards)
    if not prompts:
        return None
    gpus = float(resources.get("gpus_per_worker") or 0)
    if gpus <= 0:
        return expert_grid_png(cfg, expert_dir, prompts)
    from hdd_ray.placement import worker_task

    task = worker_task(expert_grid_png, resources,
                       num_cpus=float(resources.get("cpus_per_worker") or 1), max_retries=0)
    return wait_or_cancel(task.remote(cfg, expert_dir, prompts, GRID_PER_PROMPT, True),
                          timeout_s, f"{expert_dir}: sample grid")


def wait_or_cancel(ref: Any, timeout_s: float, what: str) -> Any:
    """``ray.get(ref)`` within ``timeout_s``; past it the task is cancelled (forced) and
    ``None`` returned with one warning line naming ``what``. Errors of the task propagate."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        try:
            ray.cancel(ref, force=True)
        except Exception as exc:  # already finished or gone: nothing left to stop
            log.debug("cancel of %s failed: %s", what, exc)
        log.warning("%s: not done within %.0f s (no free resources?): cancelled, skipped",
                    what, timeout_s)
        return None
