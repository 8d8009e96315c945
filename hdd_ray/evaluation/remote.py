"""The main job's evaluation as a Ray task with its own resources, not in the driver.

The driver (on the head node, often without a GPU) only submits. One task asks Ray for
``evaluation.resources`` (CPUs, GPUs, ``accelerator_type``, custom resources, labels), builds one
:class:`~hdd_ray.evaluation.mixture.Judge` on the device it was given
(:func:`hdd_ray.devices.pick_device`), samples and scores every mixture asked for there, and
returns their metrics dicts. MLflow is reached through the config's tracking URI
(:mod:`hdd_ray.tracking` builds its client from the config; a task does not inherit the
driver's). On a local instance a request no node can host is refused in one line first
(:mod:`hdd_ray.placement`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hdd_ray import storage
from hdd_ray.errors import CampaignError

__all__ = ["evaluate_mixtures", "evaluate_on_ray", "task_options"]


def task_options(cfg: Any) -> dict[str, Any]:
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


def _as_request(cfg: Any) -> dict[str, Any]:
    """``evaluation.resources`` in the gate's terms: one worker."""
    r = cfg.evaluation.resources
    return {"num_workers": 1, "cpus_per_worker": r.num_cpus, "gpus_per_worker": r.num_gpus,
            "custom": dict(r.custom), "accelerator_type": r.accelerator_type,
            "label_selector": dict(r.label_selector)}


def evaluate_mixtures(cfg: Any, specs: list[Any], parent_run_id: str | None = None,
                      device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Evaluate ``specs`` (:class:`~hdd_ray.evaluation.mixture.MixtureSpec`) in this process,
    sharing one judge on ``device``; one metrics dict per spec."""
    from hdd_ray.evaluation.mixture import Judge, evaluate_mixture

    judge = Judge(cfg, device)
    return [evaluate_mixture(cfg, spec, judge, parent_run_id) for spec in specs]


def _evaluation_task(cfg: Any, specs: list[Any], parent_run_id: str | None,
                     threads: int, use_gpu: bool) -> list[dict[str, Any]]:
    from hdd_ray.devices import pick_device
    from hdd_ray.progress import configure_logging

    # its sampling / scoring progress lines reach the driver's output (once: not via Ray's root
    # handler too)
    configure_logging(propagate=False)
    torch.set_num_threads(max(1, threads))
    device = pick_device(use_gpu)
    return [{**r, "device": str(device)}
            for r in evaluate_mixtures(cfg, specs, parent_run_id, device)]


def evaluate_on_ray(cfg: Any, specs: list[Any],
                    parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """Evaluate ``specs`` in one Ray task shaped by ``evaluation.resources``; Ray must be
    initialised. Returns one metrics dict per spec (with ``device``: where it ran)."""
    import ray

    from hdd_ray.cli import cluster_address
    from hdd_ray.placement import local_gate

    cfg = dataclasses.replace(cfg, root=storage.absolute(cfg.root))  # the task may run elsewhere
    gate = local_gate(cluster_address(cfg))
    reason = gate.unfit(_as_request(cfg), "evaluation.resources") if gate is not None else ""
    if reason:
        raise CampaignError(f"evaluation {reason}")
    r = cfg.evaluation.resources
    task = ray.remote(_evaluation_task).options(**task_options(cfg))
    threads = max(1, int(round(float(r.num_cpus))))
    return ray.get(task.remote(cfg, specs, parent_run_id, threads, float(r.num_gpus) > 0))
