"""The campaign launcher: every expert and the router as independent, preemptible Ray Train runs.

Each expert is its own ``TorchTrainer`` with its own ``RunConfig`` (name = expert id, storage
under ``<root>/experts``), ``FailureConfig`` and ``ScalingConfig`` (CPUs, GPUs, accelerator
type, custom resources, labels). All start at once, each ``fit()`` in its own thread (on a
local Ray instance, as many at once as its resources can place: the rest queue); one
expert's failure never stops another. The expert cache (ARCHITECTURE.md): a finished expert (valid
``weights.safetensors`` + ``expert.json``) is reused, a partial one resumed, a missing one trained.
What a run is (paths, ids, identities) comes from :mod:`hdd_ray.campaign`; this module keeps only
the Ray Train plumbing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
    check_existing,
    cluster_info,
    cluster_shards,
    expert_id,
    expert_identity,
    load_manifest,
    router_id,
    router_identity,
    with_assignment,
)
from hdd_ray.config import CampaignConfig, ResolvedExpert, resolve_experts, to_dict
from hdd_ray.errors import ExpertRejected
from hdd_ray.placement import ResourceGate, local_gate
from hdd_ray.training.loop import STATE_FILE, train_loop
from hdd_ray.training.model import ExpertModel, RouterModel, save_weights


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

        self.exp = tracking.connect(cfg)
        self.parent = parent_run_id
        self.uri = self.exp.uri if self.exp is not None else None

    def run_for(self, name: str, tags: dict[str, str]) -> str | None:
        """The run of this expert/router: reused if one exists (resume continues its curve)."""
        if self.exp is None:
            return None
        return self.exp.find_or_create(name, {"run_key": name, **tags}, key=("run_key",),
                                       parent=self.parent).run_id

    def log_curve(self, run_id: str | None, curve: dict[str, float] | None) -> None:
        """The router's top-1 accuracy against t (step = 100 t)."""
        if self.exp is None or run_id is None or not curve:
            return
        self.exp.run(run_id).log_curve("top1_accuracy_by_t", [
            (int(round(float(t) * 100)), acc) for t, acc in curve.items()])

    def finish(self, run_id: str | None, status: RunStatus, params: dict[str, Any]) -> None:
        if self.exp is None or run_id is None:
            return
        from hdd_ray.tracking import flatten, warn_on_failure

        metrics = {"steps": status.steps}
        if status.final_loss is not None:
            metrics["final_loss"] = float(status.final_loss)
        if status.wall_time_s is not None:
            metrics["wall_time_s"] = float(status.wall_time_s)
        tags = {"status": status.status, "node": status.node or ""}
        if status.reason:
            tags["reason"] = status.reason[:500]
        run = self.exp.run(run_id)
        warn_on_failure(run.log, metrics=metrics, params=flatten(params), tags=tags)
        warn_on_failure(run.finish, ok=status.ok)


def _base_loop_config(cfg: CampaignConfig, train: dict[str, Any], resources: dict[str, Any]) -> dict[str, Any]:
    cpus = float(resources["cpus_per_worker"])
    return {
        "train": train,
        "image_size": cfg.corpus.image_size,
        "channels": cfg.corpus.channels,
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

    @property
    def directory(self) -> str:
        return storage.join(self.storage_path, self.name)


def _expert_job(cfg: CampaignConfig, expert: ResolvedExpert, manifest: dict[str, Any]) -> _Job:
    paths = CampaignPaths(cfg.root)
    identity = expert_identity(cfg, expert, manifest)
    shards = cluster_shards(cfg, manifest, expert.cluster)
    count = int(cluster_info(manifest, expert.cluster)["count"])
    empty = not shards or count == 0
    size, ch = cfg.corpus.image_size, cfg.corpus.channels
    return _Job(
        kind="expert", name=expert_id(cfg, expert, manifest), cluster=expert.cluster,
        objective=expert.objective + (f"/{expert.schedule}" if expert.schedule else ""),
        storage_path=paths.experts, json_name=EXPERT_JSON, identity=identity,
        resources=expert.resources,
        loop_config={**_base_loop_config(cfg, expert.train, expert.resources), "kind": "expert",
                     "expert": asdict(expert), "shards": shards},
        build=lambda: ExpertModel(expert.model, expert.text, size, ch),
        describe={"cluster": expert.cluster, "objective": expert.objective,
                  "schedule": expert.schedule, "architecture": expert.model, "text": expert.text,
                  "image_size": size, "channels": ch, "data_hash": identity["data_hash"],
                  "num_samples": count, "resources": expert.resources},
        tags={"kind": "expert", "cluster": str(expert.cluster), "objective": expert.objective},
        precheck_error=(f"cluster {expert.cluster} has no usable data "
                        f"({paths.cluster_dir(expert.cluster)} is empty)") if empty else "",
    )


def _router_job(cfg: CampaignConfig, manifest: dict[str, Any]) -> _Job:
    from hdd_ray.evaluation.router import router_accuracy_by_t

    train, resources = to_dict(cfg.router.train), to_dict(cfg.router.resources)
    size, ch, k = cfg.corpus.image_size, cfg.corpus.channels, cfg.clustering.k
    return _Job(
        kind="router", name=router_id(cfg, manifest), cluster=None, objective="cross-entropy",
        storage_path=CampaignPaths(cfg.root).router, json_name=ROUTER_JSON,
        identity=router_identity(cfg, manifest), resources=resources,
        loop_config={**_base_loop_config(cfg, train, resources), "kind": "router",
                     "model": cfg.router.model, "num_clusters": k,
                     "cluster_shards": {str(c): cluster_shards(cfg, manifest, c) for c in range(k)}},
        build=lambda: RouterModel(cfg.router.model, size, ch, k),
        describe={"architecture": cfg.router.model, "k": k, "image_size": size, "channels": ch,
                  "data_hash": str(manifest["data_hash"])},
        tags={"kind": "router"},
        evaluate=lambda model: {"top1_accuracy_by_t": router_accuracy_by_t(model, cfg)},
    )


def _local_gate(cfg: CampaignConfig) -> ResourceGate | None:
    """The gate over the local instance's nodes (:mod:`hdd_ray.placement`); None on a cluster."""
    from hdd_ray.cli import cluster_address

    return local_gate(cluster_address(cfg))


def _execute(job: _Job, mlf: _Mlflow, gate: ResourceGate | None = None) -> RunStatus:
    """Reuse, resume or train one run; export its EMA weights + JSON. Never raises."""
    status = RunStatus(job.name, job.kind, job.cluster, job.objective, "failed")
    try:
        state = check_existing(job.directory, job.identity, job.json_name)
    except ExpertRejected as exc:
        status.status, status.reason = "rejected", _one_line(exc)
        return status
    if state == "finished":
        desc = storage.read_json(storage.join(job.directory, job.json_name))
        status.status, status.steps = "reused", int(desc["steps"])
        status.final_loss, status.wall_time_s = desc.get("final_loss"), desc.get("wall_time_s")
        status.node = desc.get("node", {}).get("hostname", "")
        return status
    if job.precheck_error:
        status.reason = job.precheck_error
        return status
    if gate is None:
        return _train(job, mlf, status)
    key = "experts.resources" if job.kind == "expert" else "router.resources"
    status.reason = gate.unfit(job.resources, key)
    if status.reason:
        return status
    with gate.hold(job.resources):
        return _train(job, mlf, status)


def _train(job: _Job, mlf: _Mlflow, status: RunStatus) -> RunStatus:
    """Train (or resume) the run under Ray Train and export it; failures land in ``status``."""
    run_id = mlf.run_for(job.name, job.tags)
    tracking = {"uri": mlf.uri, "run_id": run_id} if run_id else None
    started = time.time()
    try:
        result = _fit(job.name, job.storage_path, {**job.loop_config, "tracking": tracking},
                      job.resources)
        if result.error is not None:
            raise result.error
        final = _final_state(result)
        history = list(final["history"])
        model = job.build()
        model.load_state_dict(final["ema"])
        extra = job.evaluate(model) if job.evaluate else {}
        save_weights(storage.join(job.directory, WEIGHTS), model.exported_state())
        node = {**history[-1], "resources": _node_resources(history[-1].get("node_id"))}
        desc = {
            "identity": job.identity, f"{job.kind}_id": job.name, **job.describe, **extra,
            "steps": int(final["step"]),
            "final_loss": float(result.metrics.get("loss", float("nan"))),
            "wall_time_s": float(final["wall_time"]),
            "node": node, "attempts": history,
            "world_size": int(result.metrics.get("world_size", 1)),
            "process_group_size": int(result.metrics.get("pg_world_size", 1)),
            "mlflow_run_id": run_id,
        }
        # written last: its presence (with the weights) marks a finished, reusable run
        storage.write_json(storage.join(job.directory, job.json_name), desc)
        # attempts of this launch: the first one started from a checkpoint when resuming
        this_launch = [a for a in history if a.get("time", 0) >= started - 1] or history
        status.status = "resumed" if this_launch[0]["start_step"] > 0 else "trained"
        status.steps, status.final_loss = desc["steps"], desc["final_loss"]
        status.wall_time_s, status.attempts = desc["wall_time_s"], len(history)
        status.node = node.get("hostname", "")
        status.extra = {"node_resources": node["resources"], **extra}
        mlf.log_curve(run_id, extra.get("top1_accuracy_by_t"))
    except Exception as exc:
        status.reason = _one_line(exc)
        status.wall_time_s = time.time() - started
    mlf.finish(run_id, status, {job.kind: job.identity, "resources": job.resources})
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
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: _execute(job, mlf, gate), jobs))


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
