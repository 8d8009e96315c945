"""The export of a finished run: its EMA weights as ``weights.safetensors``, the reports
computed on them (the router's accuracy), then its description (``expert.json`` /
``router.json``), written last: its presence, with the weights, marks a finished, reusable run
(:func:`hdd_ray.campaign.existing_state` verifies the recorded checksum)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign import WEIGHTS, file_sha256, record_verified
from hdd_ray.errors import first_line
from hdd_ray.models.expert import save_weights
from hdd_ray.training.checkpoints import FinalWeights

if TYPE_CHECKING:
    from hdd_ray.training.jobs import Job

log = logging.getLogger(__name__)

__all__ = ["export_run"]


def export_run(job: Job, final: FinalWeights, metrics: dict[str, Any],
               run_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export ``job``'s run from its last checkpoint's EMA file and last metrics ->
    ``(description as written, the reports' fields)``. The file holds the weights as exported
    (no network is built, no frozen tower loaded, no optimizer state read)."""
    weights_path = storage.join(job.directory, WEIGHTS)
    save_weights(weights_path, final.weights)
    extra = _reports(job, weights_path)
    history = list(final.history)
    node = {**history[-1], "resources": _node_resources(history[-1].get("node_id"))}
    desc = {
        "identity": job.identity, f"{job.kind}_id": job.name, **job.describe, **extra,
        "steps": final.step,
        "final_loss": float(metrics.get("loss", float("nan"))),
        "wall_time_s": final.wall_time,
        "node": node, "attempts": history,
        "world_size": int(metrics.get("world_size", 1)),
        "process_group_size": int(metrics.get("pg_world_size", 1)),
        "executor": job.executor,
        # damaged samples the training worker(s) skipped (hdd_ray.training.data)
        "skipped_samples": int(metrics.get("skipped", 0)),
        "mlflow_run_id": run_id,
        # reuse verifies it (campaign.existing_state): damaged weights are never reused
        "weights_sha256": file_sha256(weights_path),
    }
    record_verified(job.directory, desc["weights_sha256"])
    # written last: its presence (with the weights) marks a finished, reusable run
    storage.write_json(storage.join(job.directory, job.json_name), desc)
    return desc, extra


def _reports(job: Job, weights_path: str) -> dict[str, Any]:
    """The run's reports on its exported weights; one that fails is a warning, never a failed
    run (the weights are trained and saved: a relaunch would only fail the same way)."""
    if job.report is None:
        return {}
    try:
        return job.report(weights_path)
    except Exception as exc:
        log.warning("%s: no report on its weights: %s", job.name, first_line(exc))
        return {}


def _node_resources(node_id: str | None) -> dict[str, float]:
    """The Ray resources of the node the run ended on (``{}`` when unknown)."""
    import ray

    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return {k: v for k, v in node.get("Resources", {}).items() if not k.startswith("node:")}
    return {}
