"""The campaign launcher: every expert and the router as independent, preemptible Ray Train runs.

Each expert is its own ``TorchTrainer`` with its own ``RunConfig`` (name = expert id, storage
under ``<root>/experts``), ``FailureConfig`` and ``ScalingConfig`` (CPUs, GPUs, accelerator
type, custom resources, labels). All start at once, each ``fit()`` in its own thread (on a
local Ray instance, as many at once as its resources can place: the rest queue); one
expert's failure never stops another. The expert cache (ARCHITECTURE.md): a finished expert (valid
``weights.safetensors`` + ``expert.json``) is reused, a partial one resumed, a missing one trained.
What a run is (paths, ids, identities) comes from :mod:`hdd_ray.campaign`; this module keeps only
the Ray Train plumbing.

``ray.executor: task`` runs each run as one Ray task instead (:func:`_fit_task`): same loop,
same checkpoints' contents, same export, without a worker group per run. It is for runs of one
worker (the demo on a laptop: Ray Train's start-up costs ~13 CPU-s per run on 2 cores, the
task's ~0 once a worker process has imported torch); DDP needs Ray Train.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from hdd_ray import storage
from hdd_ray.campaign import (
    EXPERT_JSON,
    ROUTER_JSON,
    WEIGHTS,
    CampaignPaths,
    campaign_assignments,
    cluster_info,
    cluster_shards,
    existing_state,
    expert_id,
    expert_identity,
    file_sha256,
    load_manifest,
    model_shape,
    record_verified,
    router_id,
    router_identity,
    with_assignment,
)
from hdd_ray.config import CampaignConfig, ResolvedExpert, resolve_experts, to_dict
from hdd_ray.errors import ExpertRejected
from hdd_ray.lease import RunLock
from hdd_ray.models.expert import ExpertModel, RouterModel, save_weights
from hdd_ray.placement import ResourceGate, local_gate, worker_task
from hdd_ray.progress import CampaignProgress
from hdd_ray.training.loop import (
    STATE_FILE,
    ray_train_checkpoint_metrics,
    task_checkpoint_metrics,
    task_checkpoint_state,
    train_loop,
    train_task,
)

log = logging.getLogger(__name__)


@dataclass
class RunStatus:
    """One line of the job's closing table."""

    name: str
    kind: str  # expert | router
    cluster: int | None
    objective: str
    status: str  # trained | reused | resumed | failed | rejected
    steps: int = 0
    final_loss: float | None = None
    wall_time_s: float | None = None
    node: str = ""
    reason: str = ""
    attempts: int = 0
    skipped_samples: int = 0  # damaged samples the training data reader skipped
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the run ended with usable weights."""
        return self.status in ("trained", "reused", "resumed")


# ------------------------------------------------------------------------------------- running


def _scaling(resources: dict[str, Any]):
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": float(resources["cpus_per_worker"])}
    if resources["gpus_per_worker"] > 0:
        per_worker["GPU"] = float(resources["gpus_per_worker"])
    per_worker.update({k: float(v) for k, v in resources["custom"].items()})
    return ScalingConfig(
        num_workers=int(resources["num_workers"]),
        use_gpu=resources["gpus_per_worker"] > 0,
        resources_per_worker=per_worker,
        accelerator_type=resources.get("accelerator_type"),
        label_selector=resources.get("label_selector") or None,
    )


def _fit(name: str, storage_path: str, loop_config: dict[str, Any], resources: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=_scaling(resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(
                max_failures=int(resources["max_failures"]),
                max_preemption_failures=int(resources["max_preemption_failures"]),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # one INFO line per report would drown the job's output
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _fit_task(job: _Job, loop_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run as one Ray task (``ray.executor: task``) -> ``(final state, last metrics)``.

    The task asks for the run's one worker's resources; on CPUs Ray reuses its worker
    processes, so a run starts without the new processes (and imports) of a Ray Train worker
    group (a GPU task gets a fresh process: :func:`hdd_ray.placement.worker_task`). A failed
    attempt is retried ``max_failures`` times, each resuming from the run's last checkpoint.
    ``max_preemption_failures`` does not apply: a task has no drain notice (a node lost is a
    failed attempt, resumed from the last periodic checkpoint).
    """
    import ray

    res = job.resources
    try:
        remote = worker_task(train_task, res, max_retries=int(res["max_failures"]),
                             retry_exceptions=True)
        metrics = ray.get(remote.remote(loop_config))
    except ray.exceptions.RayTaskError as exc:  # the loop's own error, not Ray's wrapper
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    final = task_checkpoint_state(job.directory)
    if final is None:
        raise RuntimeError("the run ended without a checkpoint")
    return final, metrics


def _fit_train(job: _Job, loop_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run under Ray Train (``ray.executor: train``) -> ``(final state, last metrics)``."""
    result = _fit(job.name, job.storage_path, loop_config, job.resources)
    if result.error is not None:
        raise result.error
    return _final_state(result), dict(result.metrics)


def _final_state(result) -> dict[str, Any]:
    if result.checkpoint is None:
        raise RuntimeError("the run ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _node_resources(node_id: str | None) -> dict[str, float]:
    import ray

    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return {k: v for k, v in node.get("Resources", {}).items() if not k.startswith("node:")}
    return {}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for marker in ("NoUsableData: ", "WeightsMismatch: ", "ValueError: ", "RuntimeError: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class _Mlflow:
    """The launcher's MLflow bookkeeping: one run per expert / router, created from threads."""

    def __init__(self, cfg: CampaignConfig, parent_run_id: str | None) -> None:
        from hdd_ray import tracking

        self.enabled = bool(cfg.tracking.enabled)
        # an outage gives None (one warning line); writes then go to the campaign's outbox
        self.exp = tracking.connect(cfg)
        self.parent = parent_run_id
        self.cfg = cfg
        self.outbox = tracking.Outbox(cfg.root) if self.enabled else None
        self.uri = self.exp.uri if self.exp is not None else (
            tracking.tracking_uri(cfg) if self.enabled else None)

    def run_for(self, name: str, tags: dict[str, str]) -> str | None:
        """The run of this expert/router: reused if one exists (resume continues its curve).
        ``None`` when tracking is off or MLflow is unreachable (one warning line)."""
        if self.exp is None:
            return None
        try:
            return self.exp.find_or_create(name, {"run_key": name, **tags}, key=("run_key",),
                                           parent=self.parent).run_id
        except Exception as exc:
            log.warning("%s: MLflow unreachable (%s): its metrics go to the outbox", name,
                        _one_line(exc))
            return None

    def sync(self) -> None:
        """Deliver the campaign's MLflow outbox (:func:`hdd_ray.tracking.sync_outbox`); an
        outage leaves it for the next launch or ``jobs/sync_mlflow.py``. Never raises. When
        MLflow was already found down at the start, no second connection is tried."""
        if not self.enabled:
            return
        from hdd_ray import tracking

        try:
            if self.exp is None:  # down when this launch began: count, do not connect again
                delivered, left = 0, len(self.outbox.records()) if self.outbox else 0
            else:
                delivered, left = tracking.sync_outbox(self.cfg)
        except Exception as exc:
            log.warning("MLflow outbox not delivered: %s", _one_line(exc))
            return
        if delivered or left:
            log.warning("MLflow outbox: %d records delivered, %d left%s", delivered, left,
                        " (python jobs/sync_mlflow.py delivers them)" if left else "")

    def worker_target(self, name: str, tags: dict[str, str],
                      run_id: str | None) -> dict[str, Any] | None:
        """What the run's rank 0 logs to (:class:`hdd_ray.tracking.MetricBuffer`): its run,
        or, when MLflow could not create it, the key the outbox creates it by later."""
        if not self.enabled or self.outbox is None:
            return None
        return {"uri": self.uri, "run_id": run_id, "outbox": self.outbox.directory,
                "run_key": name, "run_name": name, "tags": tags, "parent": self.parent}

    def log_curve(self, run_id: str | None, curve: dict[str, float] | None) -> None:
        """The router's top-1 accuracy against t (step = 100 t)."""
        if self.exp is None or run_id is None or not curve:
            return
        self.exp.run(run_id).log_curve("top1_accuracy_by_t", [
            (int(round(float(t) * 100)), acc) for t, acc in curve.items()])

    def log_grid(self, run_id: str | None, job: _Job) -> None:
        """A finished expert's sample grid (:mod:`hdd_ray.preview`) on its run; a failure is
        a warning, never a failed run. Skipped when tracking is off (nobody would see it)."""
        if self.exp is None or run_id is None or job.kind != "expert":
            return
        try:
            from hdd_ray.preview import GRID_FILE, expert_grid

            png = expert_grid(self.cfg, job.directory, job.loop_config.get("shards") or [],
                              job.resources)
            if png is not None:
                self.exp.run(run_id).log_image(png, artifact_file=GRID_FILE)
        except Exception as exc:
            log.warning("%s: no sample grid: %s", job.name, _one_line(exc))

    def finish(self, run_id: str | None, status: RunStatus, params: dict[str, Any],
               name: str = "", run_tags: dict[str, str] | None = None) -> None:
        """The run's final metrics, params, status tags and end; never raises. Without a run
        (MLflow was down when it started) they go to the outbox under the run's key."""
        if not self.enabled:
            return
        from hdd_ray.tracking import _now_ms, flatten, warn_on_failure

        metrics = {"steps": status.steps, "skipped_samples": status.skipped_samples}
        if status.final_loss is not None and status.final_loss == status.final_loss:
            metrics["final_loss"] = float(status.final_loss)
        if status.wall_time_s is not None:
            metrics["wall_time_s"] = float(status.wall_time_s)
        tags = {"status": status.status, "node": status.node or ""}
        if status.reason:
            tags["reason"] = status.reason[:500]
        if run_id is not None and self.exp is not None:
            run = self.exp.run(run_id)  # failed writes go to the outbox (tracking.TrackedRun)
            warn_on_failure(run.log, metrics=metrics, params=flatten(params), tags=tags)
            warn_on_failure(run.finish, ok=status.ok)
            return
        if self.outbox is None or not name:
            return
        now = _now_ms()
        record = {"uri": self.uri, "run_id": run_id, "run_key": name, "run_name": name,
                  "tags": run_tags or {}, "parent": self.parent, "run_tags": tags,
                  "metrics": [[k, float(v), now, 0] for k, v in metrics.items()],
                  "params": flatten(params), "status": "FINISHED" if status.ok else "FAILED"}
        warn_on_failure(self.outbox.put, record)


def _base_loop_config(cfg: CampaignConfig, train: dict[str, Any], resources: dict[str, Any],
                      manifest: dict[str, Any]) -> dict[str, Any]:
    cpus = float(resources["cpus_per_worker"])
    size, channels = model_shape(cfg, manifest)  # the latent shape in latent space
    return {
        "train": train,
        "image_size": size,
        "channels": channels,
        # the manifest's latents record (VAE identity, shape, scaling): the shards hold
        # ``latent.npy`` members instead of images; None in pixel space
        "latents": manifest.get("latents") or None,
        "use_gpu": resources["gpus_per_worker"] > 0,
        "torch_threads": max(1, int(round(cpus))),
    }


@dataclass
class _Job:
    """One independent training run (an expert or the router), as the launcher executes it."""

    kind: str
    name: str
    cluster: int | None
    objective: str
    storage_path: str  # Ray Train storage: the run lives in <storage_path>/<name>
    json_name: str
    identity: dict[str, Any]
    resources: dict[str, Any]
    loop_config: dict[str, Any]
    build: Callable[[], torch.nn.Module]  # the architecture, for the exported EMA weights
    describe: dict[str, Any]  # fixed fields of the exported JSON
    tags: dict[str, str]
    precheck_error: str = ""
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # extra JSON fields
    executor: str = "train"  # ray.executor: "train" (Ray Train) or "task" (one Ray task)

    @property
    def directory(self) -> str:
        return storage.join(self.storage_path, self.name)


def _latents_describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"latents": record}`` for expert.json / router.json in latent space (the VAE a
    mixture checks), nothing in pixel space."""
    rec = manifest.get("latents")
    return {"latents": rec} if rec else {}


def _expert_job(cfg: CampaignConfig, expert: ResolvedExpert, manifest: dict[str, Any]) -> _Job:
    paths = CampaignPaths(cfg.root)
    identity = expert_identity(cfg, expert, manifest)
    shards = cluster_shards(cfg, manifest, expert.cluster)
    count = int(cluster_info(manifest, expert.cluster)["count"])
    empty = not shards or count == 0
    size, ch = model_shape(cfg, manifest)
    return _Job(
        kind="expert", name=expert_id(cfg, expert, manifest), cluster=expert.cluster,
        objective=expert.objective + (f"/{expert.schedule}" if expert.schedule else ""),
        storage_path=paths.experts, json_name=EXPERT_JSON, identity=identity,
        resources=expert.resources,
        loop_config={**_base_loop_config(cfg, expert.train, expert.resources, manifest),
                     "kind": "expert",
                     "expert": asdict(expert), "shards": shards,
                     # how the worker reads them (hdd_ray.training.data): memory or stream
                     "data": to_dict(cfg.experts.data), "num_samples": count},
        build=lambda: ExpertModel(expert.model, expert.text, size, ch),
        describe={"cluster": expert.cluster, "objective": expert.objective,
                  "schedule": expert.schedule, "architecture": expert.model, "text": expert.text,
                  "image_size": size, "channels": ch, "data_hash": identity["data_hash"],
                  "num_samples": count, "resources": expert.resources,
                  **_latents_describe(manifest)},
        tags={"kind": "expert", "cluster": str(expert.cluster), "objective": expert.objective},
        executor=cfg.ray.executor,
        precheck_error=(f"cluster {expert.cluster} has no usable data "
                        f"({paths.cluster_dir(expert.cluster)} is empty)") if empty else "",
    )


def _router_job(cfg: CampaignConfig, manifest: dict[str, Any]) -> _Job:
    from hdd_ray.evaluation.router import router_accuracy_by_t

    train, resources = to_dict(cfg.router.train), to_dict(cfg.router.resources)
    (size, ch), k = model_shape(cfg, manifest), cfg.clustering.k
    return _Job(
        kind="router", name=router_id(cfg, manifest), cluster=None, objective="cross-entropy",
        storage_path=CampaignPaths(cfg.root).router, json_name=ROUTER_JSON,
        identity=router_identity(cfg, manifest), resources=resources,
        loop_config={**_base_loop_config(cfg, train, resources, manifest), "kind": "router",
                     "model": cfg.router.model, "num_clusters": k,
                     "cluster_shards": {str(c): cluster_shards(cfg, manifest, c) for c in range(k)},
                     "data": to_dict(cfg.router.data),
                     "cluster_counts": {str(c): int(cluster_info(manifest, c)["count"])
                                        for c in range(k)}},
        build=lambda: RouterModel(cfg.router.model, size, ch, k),
        describe={"architecture": cfg.router.model, "k": k, "image_size": size, "channels": ch,
                  "data_hash": str(manifest["data_hash"]), **_latents_describe(manifest)},
        tags={"kind": "router"},
        executor=cfg.ray.executor,
        evaluate=lambda model: {"top1_accuracy_by_t": router_accuracy_by_t(model, cfg)},
    )


def _local_gate(cfg: CampaignConfig) -> ResourceGate | None:
    """The gate over the local instance's nodes (:mod:`hdd_ray.placement`); None on a cluster."""
    from hdd_ray.placement import cluster_address

    return local_gate(cluster_address(cfg))


def _execute(job: _Job, mlf: _Mlflow, gate: ResourceGate | None = None,
             progress: CampaignProgress | None = None) -> RunStatus:
    """Reuse, resume or train one run; export its EMA weights + JSON; its progress lines
    (:class:`hdd_ray.progress.CampaignProgress`) when it ends. Never raises."""
    try:
        status = _execute_one(job, mlf, gate, progress)
    except Exception as exc:  # e.g. storage unreachable: this run fails, never the campaign
        log.warning("%s: %s", job.name, _one_line(exc))
        status = RunStatus(job.name, job.kind, job.cluster, job.objective, "failed",
                           reason=_one_line(exc))
    try:
        if progress is not None:
            progress.end(status, status.extra.get("steps_per_s"))
    except Exception as exc:
        log.warning("%s: progress line failed: %s", job.name, _one_line(exc))
    return status


def _execute_one(job: _Job, mlf: _Mlflow, gate: ResourceGate | None,
                 progress: CampaignProgress | None) -> RunStatus:
    status = RunStatus(job.name, job.kind, job.cluster, job.objective, "failed")
    if _reuse(job, status):
        return status
    if job.precheck_error:
        status.reason = job.precheck_error
        return status
    key = "experts.resources" if job.kind == "expert" else "router.resources"
    if gate is not None:
        unfit = gate.unfit(job.resources, key)
        if unfit:
            status.reason = unfit
            return status

    damaged = status.reason  # a damaged run of our own: its one line stays in the table

    def waiting(holder: str) -> None:
        log.warning("%s: waiting: %s is training it", job.name, holder)
        status.reason = f"waited for {holder}"

    # one writer per run directory (hdd_ray.lease): a second launcher waits, then reuses
    with RunLock(job.directory).hold(on_wait=waiting) as waited:
        if waited:
            waited_reason = status.reason
            status.reason = ""
            if _reuse(job, status):
                status.reason = status.reason or waited_reason
                return status
            status.reason = status.reason or damaged
        if gate is None:
            return _train(job, mlf, status, progress)
        with gate.hold(job.resources):
            return _train(job, mlf, status, progress)


def _reuse(job: _Job, status: RunStatus) -> bool:
    """Whether ``status`` is final without training: ``reused`` (a whole finished run) or
    ``rejected`` (another identity, or a damaged contributed run). A damaged run of this
    campaign's own leaves its one-line reason in ``status.reason`` and is trained again."""
    try:
        state, why = existing_state(job.directory, job.identity, job.json_name)
    except ExpertRejected as exc:
        status.status, status.reason = "rejected", _one_line(exc)
        return True
    if state == "corrupt":
        log.warning("%s: %s", job.name, why)
        status.reason = why
        return False
    if state != "finished":
        return False
    desc = storage.read_json(storage.join(job.directory, job.json_name))
    status.status, status.steps = "reused", int(desc["steps"])
    status.final_loss, status.wall_time_s = desc.get("final_loss"), desc.get("wall_time_s")
    try:  # damaged samples its training skipped (older exports: none recorded)
        status.skipped_samples = int(desc.get("skipped_samples") or 0)
    except (TypeError, ValueError):
        status.skipped_samples = 0
    node = desc.get("node")
    status.node = node.get("hostname", "") if isinstance(node, dict) else ""
    return True


#: seconds between two checkpoint progress lines of one run (at most)
CHECKPOINT_LINE_EVERY_S = 30.0


def latest_checkpoint_metrics(directory: str) -> dict[str, Any] | None:
    """The metrics (``step``, ``loss``, ``steps_per_s``) reported with a run's newest
    checkpoint, Ray Train's (``checkpoint_manager_snapshot.json``) or the task executor's
    (``checkpoint_task/metrics.json``), or ``None``."""
    found = [m for m in (ray_train_checkpoint_metrics(directory),
                         task_checkpoint_metrics(directory)) if m]
    try:
        return max(found, key=lambda m: int(m.get("step", 0))) if found else None
    except (TypeError, ValueError):
        return found[0]


def latest_checkpoint_step(directory: str) -> int | None:
    """The step of a run's latest registered checkpoint, or ``None`` (none yet)."""
    metrics = latest_checkpoint_metrics(directory)
    try:
        return int(metrics["step"]) if metrics else None
    except (KeyError, TypeError, ValueError):
        return None


@contextlib.contextmanager
def _checkpoint_lines(job: _Job, progress: CampaignProgress | None) -> Iterator[None]:
    """While the run trains: a line per new checkpoint (step, steps/s, loss), at most one per
    :data:`CHECKPOINT_LINE_EVERY_S`, read by the driver from the run's newest checkpoint
    metrics (:func:`latest_checkpoint_metrics`)."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    steps = int(job.loop_config["train"]["steps"])

    def watch() -> None:
        seen = latest_checkpoint_step(job.directory)
        while not stop.wait(CHECKPOINT_LINE_EVERY_S):
            metrics = latest_checkpoint_metrics(job.directory)
            step = int(metrics.get("step", 0)) if metrics else None
            if step and step != seen and step < steps:
                seen = step
                progress.checkpoint(job.name, step, steps, metrics.get("steps_per_s"),
                                    metrics.get("loss"))

    thread = threading.Thread(target=watch, name=f"progress-{job.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _train(job: _Job, mlf: _Mlflow, status: RunStatus,
           progress: CampaignProgress | None = None) -> RunStatus:
    """Train (or resume) the run under Ray Train (or as a Ray task: ``ray.executor``) and
    export it; failures land in ``status``."""
    if progress is not None:
        where = f"{job.objective}" + (f", cluster {job.cluster}" if job.cluster is not None else "")
        progress.start(job.name, where, int(job.loop_config["train"]["steps"]),
                       latest_checkpoint_step(job.directory))
    run_id = mlf.run_for(job.name, job.tags)
    tracking = mlf.worker_target(job.name, job.tags, run_id)
    started = time.time()
    try:
        loop_config = {**job.loop_config, "tracking": tracking, "run_directory": job.directory}
        fit = _fit_task if job.executor == "task" else _fit_train
        with _checkpoint_lines(job, progress):
            final, metrics = fit(job, loop_config)
        history = list(final["history"])
        model = job.build()
        model.load_state_dict(final["ema"])
        extra = job.evaluate(model) if job.evaluate else {}
        weights_path = storage.join(job.directory, WEIGHTS)
        save_weights(weights_path, model.exported_state())
        node = {**history[-1], "resources": _node_resources(history[-1].get("node_id"))}
        desc = {
            "identity": job.identity, f"{job.kind}_id": job.name, **job.describe, **extra,
            "steps": int(final["step"]),
            "final_loss": float(metrics.get("loss", float("nan"))),
            "wall_time_s": float(final["wall_time"]),
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
        # attempts of this launch: the first one started from a checkpoint when resuming
        this_launch = [a for a in history if a.get("time", 0) >= started - 1] or history
        status.status = "resumed" if this_launch[0]["start_step"] > 0 else "trained"
        status.steps, status.final_loss = desc["steps"], desc["final_loss"]
        status.wall_time_s, status.attempts = desc["wall_time_s"], len(history)
        status.skipped_samples = desc["skipped_samples"]
        status.node = node.get("hostname", "")
        status.extra = {"node_resources": node["resources"], **extra, "executor": job.executor,
                        "steps_per_s": float(metrics.get("steps_per_s") or 0.0)}
        mlf.log_curve(run_id, extra.get("top1_accuracy_by_t"))
        mlf.log_grid(run_id, job)
    except Exception as exc:
        status.reason = _one_line(exc)
        status.wall_time_s = time.time() - started
    mlf.finish(run_id, status, {job.kind: job.identity, "resources": job.resources},
               job.name, job.tags)
    return status


def train_campaign(
    cfg: CampaignConfig,
    only: list[int] | None = None,
    include_router: bool = True,
    parent_run_id: str | None = None,
    assignments: list[list[int]] | None = None,
) -> list[RunStatus]:
    """Train (or reuse / resume) every expert of the campaign and the router, concurrently.

    ``assignments`` (default :func:`campaign_assignments`) lists the objective assignments whose
    experts are needed; an expert shared by several (same id) is trained once. ``only``
    restricts to expert indices (clusters). Ray must be initialised. One status per run.
    """
    cfg = replace(cfg, root=storage.absolute(cfg.root))
    manifest = load_manifest(cfg)
    jobs: list[_Job] = []
    seen: set[str] = set()
    mlf = _Mlflow(cfg, parent_run_id)
    for ddpm in assignments or campaign_assignments(cfg):
        variant = with_assignment(cfg, ddpm)
        for e in resolve_experts(variant):
            eid = expert_id(variant, e, manifest)
            if (only is not None and e.index not in set(only)) or eid in seen:
                continue
            seen.add(eid)
            jobs.append(_expert_job(variant, e, manifest))
    jobs.sort(key=lambda job: job.cluster)
    if include_router:
        jobs.append(_router_job(cfg, manifest))
    workers = cfg.ray.max_concurrent_experts or len(jobs)
    gate = _local_gate(cfg)
    progress = CampaignProgress(len(jobs), workers)
    mlf.sync()  # writes an earlier outage kept in the outbox
    # longest first (steps x batch): when runs queue for a few slots, the last ones are short,
    # so no long run finishes alone with the other cores idle; statuses keep the campaign order
    order = sorted(range(len(jobs)), key=lambda i: -_work(jobs[i]))
    with _no_preemption_watcher_on_one_node(gate), \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = dict(zip(order, pool.map(lambda i: _execute(jobs[i], mlf, gate, progress), order),
                        strict=True))
    statuses = [done[i] for i in range(len(jobs))]
    mlf.sync()  # what this launch's workers could not deliver
    return statuses


def _work(job: _Job) -> int:
    """A run's size for ordering the queue: samples it draws (steps x batch x accumulation)."""
    train = job.loop_config["train"]
    return int(train["steps"]) * int(train["batch_size"]) * int(train.get("grad_accum", 1))


#: Ray Train's switch for its per-run preemption watcher actor (read when ``fit()`` starts)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextlib.contextmanager
def _no_preemption_watcher_on_one_node(gate: ResourceGate | None) -> Iterator[None]:
    """On a one-node local instance, start trainers without Ray Train's preemption watcher.

    The watcher is one more actor process per run, polling for drained nodes; when the only
    node is drained the whole instance goes, so there is nothing to watch for. Each trainer then
    brings four processes instead of five (benchmarks/README.md, "Demo main job"). On a
    cluster, or a local instance of several nodes, nothing changes; a value the user set wins.
    """
    if gate is None or len(gate.nodes) != 1 or PREEMPTION_WATCHER_ENV in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(PREEMPTION_WATCHER_ENV, None)


def format_table(statuses: list[RunStatus]) -> str:
    """The per-run status table printed at the end of the job."""
    head = f"{'run':<24} {'cluster':>7} {'objective':<16} {'status':<9} {'steps':>6} {'loss':>8} {'wall s':>7} {'node':<14} reason"
    lines = [head, "-" * len(head)]
    for s in statuses:
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        wall = f"{s.wall_time_s:.0f}" if s.wall_time_s is not None else "-"
        cluster = str(s.cluster) if s.cluster is not None else "-"
        lines.append(f"{s.name:<24} {cluster:>7} {s.objective:<16} {s.status:<9} {s.steps:>6} "
                     f"{loss:>8} {wall:>7} {s.node[:14]:<14} {s.reason}")
    return "\n".join(lines)


__all__ = ["RunStatus", "format_table", "train_campaign"]
