"""The campaign launcher: every expert and the router as independent, preemptible runs.

Each run is its own Ray Train run (``ray.executor: train``) or one Ray task (``task``), with its
own resources, failure handling and checkpoints (:mod:`hdd_ray.training.executors`). All start
at once, each in its own thread (on a local Ray instance, as many at once as its resources can
place: the rest queue); one run's failure never stops another. The expert cache
(ARCHITECTURE.md): a finished run (valid ``weights.safetensors`` + ``expert.json``) is reused, a
partial one resumed, a missing one trained, then exported (:mod:`hdd_ray.training.export`).
What a run is comes from :mod:`hdd_ray.training.jobs` (its paths, ids and identities from
:mod:`hdd_ray.campaign`); its MLflow run from :class:`hdd_ray.tracking.RunTracker`; its lines
and the closing table from :mod:`hdd_ray.progress`. This module keeps the orchestration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from hdd_ray import storage
from hdd_ray.campaign import (
    campaign_assignments,
    existing_state,
    expert_id,
    load_manifest,
    with_assignment,
)
from hdd_ray.config import CampaignConfig, resolve_experts
from hdd_ray.errors import ExpertRejected
from hdd_ray.lease import RunLock
from hdd_ray.placement import ResourceGate, local_gate
from hdd_ray.progress import CampaignProgress, RunStatus
from hdd_ray.tracking import RunTracker
from hdd_ray.training.checkpoints import latest_checkpoint_metrics, latest_checkpoint_step
from hdd_ray.training.executors import fit, one_line
from hdd_ray.training.export import export_run
from hdd_ray.training.jobs import Job, expert_job, router_job
from hdd_ray.training.reports import log_sample_grid

log = logging.getLogger(__name__)

__all__ = ["train_campaign", "train_student"]


def _local_gate(cfg: CampaignConfig) -> ResourceGate | None:
    """The gate over the local instance's nodes (:mod:`hdd_ray.placement`); None on a cluster."""
    from hdd_ray.placement import cluster_address

    return local_gate(cluster_address(cfg))


def _execute(job: Job, runs: RunTracker, gate: ResourceGate | None = None,
             progress: CampaignProgress | None = None) -> RunStatus:
    """Reuse, resume or train one run; export its EMA weights + JSON; its progress lines
    (:class:`hdd_ray.progress.CampaignProgress`) when it ends. Never raises."""
    try:
        status = _execute_one(job, runs, gate, progress)
    except Exception as exc:  # e.g. storage unreachable: this run fails, never the campaign
        log.warning("%s: %s", job.name, one_line(exc))
        status = RunStatus(job.name, job.kind, job.cluster, job.objective, "failed",
                           reason=one_line(exc))
    try:
        if progress is not None:
            progress.end(status, status.extra.get("steps_per_s"))
    except Exception as exc:
        log.warning("%s: progress line failed: %s", job.name, one_line(exc))
    return status


def _execute_one(job: Job, runs: RunTracker, gate: ResourceGate | None,
                 progress: CampaignProgress | None) -> RunStatus:
    status = RunStatus(job.name, job.kind, job.cluster, job.objective, "failed")
    if _reuse(job, status):
        return status
    if job.precheck_error:
        status.reason = job.precheck_error
        return status
    key = {"expert": "experts.resources", "student": "distill.resources"}.get(
        job.kind, "router.resources")
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
            return _train(job, runs, status, progress)
        with gate.hold(job.resources):
            return _train(job, runs, status, progress)


def _reuse(job: Job, status: RunStatus) -> bool:
    """Whether ``status`` is final without training: ``reused`` (a whole finished run) or
    ``rejected`` (another identity, or a damaged contributed run). A damaged run of this
    campaign's own leaves its one-line reason in ``status.reason`` and is trained again."""
    try:
        state, why = existing_state(job.directory, job.identity, job.json_name)
    except ExpertRejected as exc:
        status.status, status.reason = "rejected", one_line(exc)
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


@contextlib.contextmanager
def _checkpoint_lines(job: Job, progress: CampaignProgress | None) -> Iterator[None]:
    """While the run trains: a line per new checkpoint (step, steps/s, loss), at most one per
    :data:`CHECKPOINT_LINE_EVERY_S`, read by the driver from the run's newest checkpoint
    metrics (:func:`latest_checkpoint_metrics`)."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    steps = int(job.settings.train.steps)

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


def _train(job: Job, runs: RunTracker, status: RunStatus,
           progress: CampaignProgress | None = None) -> RunStatus:
    """Train (or resume) the run with its executor (``ray.executor``) and export it; failures
    land in ``status``."""
    if progress is not None:
        where = f"{job.objective}" + (f", cluster {job.cluster}" if job.cluster is not None else "")
        progress.start(job.name, where, int(job.settings.train.steps),
                       latest_checkpoint_step(job.directory))
    run_id = runs.run_for(job.name, job.tags)
    target = runs.worker_target(job.name, job.tags, run_id)
    started = time.time()
    try:
        settings = replace(job.settings, tracking=target, run_directory=job.directory)
        with _checkpoint_lines(job, progress):
            final, metrics = fit(job.executor, settings, job.resources, job.storage_path,
                                 job.name)
        desc, extra = export_run(job, final, metrics, run_id)
        history = desc["attempts"]
        # attempts of this launch: the first one started from a checkpoint when resuming
        this_launch = [a for a in history if a.get("time", 0) >= started - 1] or history
        status.status = "resumed" if this_launch[0]["start_step"] > 0 else "trained"
        status.steps, status.final_loss = desc["steps"], desc["final_loss"]
        status.wall_time_s, status.attempts = desc["wall_time_s"], len(history)
        status.skipped_samples = desc["skipped_samples"]
        status.node = desc["node"].get("hostname", "")
        status.extra = {"node_resources": desc["node"]["resources"], **extra,
                        "executor": job.executor,
                        "steps_per_s": float(metrics.get("steps_per_s") or 0.0)}
        runs.log_curve(run_id, "top1_accuracy_by_t", extra.get("top1_accuracy_by_t"))
        log_sample_grid(runs, run_id, runs.cfg, job)
    except Exception as exc:
        status.reason = one_line(exc)
        status.wall_time_s = time.time() - started
    runs.finish(run_id, status, {job.kind: job.identity, "resources": job.resources},
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
    jobs: list[Job] = []
    seen: set[str] = set()
    runs = RunTracker(cfg, parent_run_id)
    for ddpm in assignments or campaign_assignments(cfg):
        variant = with_assignment(cfg, ddpm)
        for e in resolve_experts(variant):
            eid = expert_id(variant, e, manifest)
            if (only is not None and e.index not in set(only)) or eid in seen:
                continue
            seen.add(eid)
            jobs.append(expert_job(variant, e, manifest))
    jobs.sort(key=lambda job: job.cluster)
    if include_router:
        jobs.append(router_job(cfg, manifest))
    workers = cfg.ray.max_concurrent_experts or len(jobs)
    gate = _local_gate(cfg)
    progress = CampaignProgress(len(jobs), workers)
    runs.sync()  # writes an earlier outage kept in the outbox
    # longest first (steps x batch): when runs queue for a few slots, the last ones are short,
    # so no long run finishes alone with the other cores idle; statuses keep the campaign order
    order = sorted(range(len(jobs)), key=lambda i: -_work(jobs[i]))
    with _no_preemption_watcher_on_one_node(gate), \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = dict(zip(order, pool.map(lambda i: _execute(jobs[i], runs, gate, progress), order),
                        strict=True))
    statuses = [done[i] for i in range(len(jobs))]
    runs.sync()  # what this launch's workers could not deliver
    return statuses


def train_student(cfg: CampaignConfig, job: Job, parent_run_id: str | None = None) -> RunStatus:
    """Train (or reuse / resume) a distilled student's run (:func:`hdd_ray.training.jobs.
    student_job`) like an expert's: its own executor, checkpoints, failure handling, export and
    MLflow run (a child of ``parent_run_id``, tagged with its teacher). Ray must be
    initialised; never raises (a failure is the status's reason)."""
    runs = RunTracker(replace(cfg, root=storage.absolute(cfg.root)), parent_run_id)
    gate = _local_gate(cfg)
    runs.sync()
    with _no_preemption_watcher_on_one_node(gate):
        status = _execute(job, runs, gate, CampaignProgress(1, 1))
    runs.sync()
    return status


def _work(job: Job) -> int:
    """A run's size for ordering the queue: samples it draws (steps x batch x accumulation)."""
    train = job.settings.train
    return int(train.steps) * int(train.batch_size) * int(train.grad_accum)


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
