"""What a finished run reports about what it trained, through the evaluation layer: the
router's top-1 accuracy by t (in a Ray task with the router's own resources, on the exported
weights) and an expert's sample grid (on its MLflow run)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hdd_ray.placement import worker_task
from hdd_ray.training.executors import one_line

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.tracking import RunTracker
    from hdd_ray.training.jobs import Job

log = logging.getLogger(__name__)

__all__ = ["log_sample_grid", "router_accuracy", "router_accuracy_task"]


def router_accuracy_task(cfg: CampaignConfig, weights_path: str,
                         use_gpu: bool) -> dict[str, float]:
    """The router worker's entry point: the top-1 accuracy by t of the router exported at
    ``weights_path`` (:func:`hdd_ray.evaluation.router.router_accuracy_of`)."""
    from hdd_ray.evaluation.router import router_accuracy_of

    return router_accuracy_of(cfg, weights_path, use_gpu)


def router_accuracy(cfg: CampaignConfig, weights_path: str,
                    resources: dict[str, Any]) -> dict[str, float]:
    """:func:`router_accuracy_task` in a Ray task shaped like one of the router's workers
    (``router.resources``: on its GPU when it has one), so the driver never runs the router."""
    import ray

    use_gpu = float(resources.get("gpus_per_worker") or 0) > 0
    # a worker lost is retried as the training was (max_failures); the evaluation's own error is not
    task = worker_task(router_accuracy_task, resources, max_retries=int(resources["max_failures"]))
    try:
        return ray.get(task.remote(cfg, weights_path, use_gpu))
    except ray.exceptions.RayTaskError as exc:  # the evaluation's own error, not Ray's wrapper
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def log_sample_grid(runs: RunTracker, run_id: str | None, cfg: CampaignConfig,
                    job: Job) -> None:
    """A finished expert's sample grid (:mod:`hdd_ray.preview`) on its MLflow run; a failure is
    a warning, never a failed run. Skipped without a run (nobody would see it)."""
    if run_id is None or job.kind != "expert":
        return
    try:
        from hdd_ray.preview import GRID_FILE, expert_grid

        png = expert_grid(cfg, job.directory, job.settings.shards, job.resources)
        if png is not None:
            runs.log_image(run_id, png, GRID_FILE)
    except Exception as exc:
        log.warning("%s: no sample grid: %s", job.name, one_line(exc))
