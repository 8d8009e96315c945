"""The main job's evaluation as a Ray task with its own resources, not in the driver.

The driver (on the head node, often without a GPU) only submits. Every task asks Ray for
``evaluation.resources`` (CPUs, GPUs, ``accelerator_type``, custom resources, labels) and builds a
:class:`~hdd_ray.evaluation.judge.Judge` on the device it was given
(:func:`hdd_ray.devices.pick_device`). With one mixture, one task samples and scores it. With
several, a first task builds the campaign's judge caches (the reference CLIP, the reference
statistics: trained or computed once per campaign), then one task per mixture samples and scores
it, all submitted at once: Ray runs as many side by side as the instance has room for (two on the
demo's two CPUs, one per GPU on a cluster), each loading the cached judge. Metrics are the same
whichever way they ran (a mixture's sampling is seeded by its spec). MLflow is reached through the config's tracking URI
(:mod:`hdd_ray.tracking` builds its client from the config; a task does not inherit the
driver's). On a local instance a request no node can host is refused in one line first
(:mod:`hdd_ray.placement`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from hdd_ray import storage
from hdd_ray.errors import CampaignError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.ensemble import MixtureSpec

__all__ = ["evaluate_mixtures", "evaluate_on_ray", "task_options"]


def task_options(cfg: CampaignConfig) -> dict[str, Any]:
    """``ray.remote(...).options(...)`` of the evaluation task, from ``evaluation.resources``."""
    r = cfg.evaluation.resources
    opts: dict[str, Any] = {"num_cpus": float(r.num_cpus), "num_gpus": float(r.num_gpus),
                            "max_retries": 0}
    if r.accelerator_type:
        opts["accelerator_type"] = r.accelerator_type
    if r.custom:
        opts["resources"] = {k: float(v) for k, v in r.custom.items()}
    if r.label_selector:
        opts["label_selector"] = dict(r.label_selector)
    return opts


def _as_request(cfg: CampaignConfig) -> dict[str, Any]:
    """``evaluation.resources`` in the gate's terms: one worker."""
    r = cfg.evaluation.resources
    return {"num_workers": 1, "cpus_per_worker": r.num_cpus, "gpus_per_worker": r.num_gpus,
            "custom": dict(r.custom), "accelerator_type": r.accelerator_type,
            "label_selector": dict(r.label_selector)}


def evaluate_mixtures(cfg: CampaignConfig, specs: list[MixtureSpec],
                      parent_run_id: str | None = None,
                      device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Evaluate ``specs`` (:class:`~hdd_ray.ensemble.MixtureSpec`) in this process, sharing one
    judge on ``device``; one metrics dict per spec."""
    from hdd_ray.evaluation.judge import Judge
    from hdd_ray.evaluation.mixture import evaluate_mixture

    judge = Judge(cfg, device)
    return [evaluate_mixture(cfg, spec, judge, parent_run_id) for spec in specs]


def _task_device(threads: int, use_gpu: bool) -> torch.device:
    from hdd_ray.devices import pick_device
    from hdd_ray.progress import configure_logging

    # its sampling / scoring progress lines reach the driver's output (once: not via Ray's root
    # handler too)
    configure_logging(propagate=False)
    torch.set_num_threads(max(1, threads))
    return pick_device(use_gpu)


def _evaluation_task(cfg: CampaignConfig, specs: list[MixtureSpec],
                     parent_run_id: str | None,
                     threads: int, use_gpu: bool) -> list[dict[str, Any]]:
    device = _task_device(threads, use_gpu)
    return [{**r, "device": str(device)}
            for r in evaluate_mixtures(cfg, specs, parent_run_id, device)]


def _judge_task(cfg: CampaignConfig, threads: int, use_gpu: bool) -> None:
    """Build the judge once, so that its caches (reference CLIP, reference statistics) exist
    before the per-mixture tasks load them side by side."""
    from hdd_ray.evaluation.judge import Judge

    Judge(cfg, _task_device(threads, use_gpu))


def evaluate_on_ray(cfg: CampaignConfig, specs: list[MixtureSpec],
                    parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Evaluate ``specs`` in Ray tasks shaped by ``evaluation.resources`` (one per mixture, side
    by side where there is room, after one that builds the judge's caches); Ray must be
    initialised. Returns one metrics dict per spec, in order (with ``device``: where it ran)."""
    import ray

    from hdd_ray.placement import cluster_address, local_gate, task_function

    cfg = dataclasses.replace(cfg, root=storage.absolute(cfg.root))  # the task may run elsewhere
    gate = local_gate(cluster_address(cfg))
    reason = gate.unfit(_as_request(cfg), "evaluation.resources") if gate is not None else ""
    if reason:
        raise CampaignError(f"evaluation {reason}")
    r = cfg.evaluation.resources
    options = task_options(cfg)
    # a GPU task in a fresh process each time (hdd_ray.placement.task_function)
    task = task_function(_evaluation_task, r.num_gpus).options(**options)
    threads = max(1, int(round(float(r.num_cpus))))
    use_gpu = float(r.num_gpus) > 0
    if len(specs) <= 1:
        return ray.get(task.remote(cfg, specs, parent_run_id, threads, use_gpu))
    # the caches first (one task trains the reference CLIP), then every mixture at once
    judge = task_function(_judge_task, r.num_gpus).options(**options)
    ray.get(judge.remote(cfg, threads, use_gpu))
    refs = [task.remote(cfg, [spec], parent_run_id, threads, use_gpu) for spec in specs]
    return [result for batch in ray.get(refs) for result in batch]
