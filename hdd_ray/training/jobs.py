"""What the launcher executes: one :class:`Job` per independent training run, an expert
(:func:`expert_job`), the router (:func:`router_job`) or a distilled student
(:func:`student_job`, :mod:`hdd_ray.training.distill`).

A job holds what the campaign decides about its run: its id and identity (from
:mod:`hdd_ray.campaign`), its resources, the :class:`~hdd_ray.training.settings.RunSettings` its
workers train by, and what its export holds (the architecture for the EMA weights, the fixed
fields of ``expert.json`` / ``router.json``, and for the router the report computed on the
exported weights: its top-1 accuracy by t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hdd_ray import storage
from hdd_ray.campaign import (
    EXPERT_JSON,
    ROUTER_JSON,
    STUDENT_JSON,
    WEIGHTS,
    CampaignPaths,
    check_text_features,
    cluster_info,
    cluster_shards,
    describe_router_init,
    expert_id,
    expert_identity,
    expert_start,
    file_sha256,
    grown_from,
    model_shape,
    router_id,
    router_identity,
    router_train,
    student_id,
    student_identity,
    with_k,
)
from hdd_ray.config import CampaignConfig, ResolvedExpert, TrainConfig, to_dict
from hdd_ray.training.data import data_settings
from hdd_ray.training.memory import expert_plan, router_plan
from hdd_ray.training.reports import router_accuracy
from hdd_ray.training.settings import RunSettings

__all__ = ["Job", "expert_job", "router_job", "student_job"]


@dataclass
class Job:
    """One independent training run (an expert or the router), as the launcher executes it."""

    kind: str
    name: str
    cluster: int | None
    objective: str
    storage_path: str  # Ray Train storage: the run lives in <storage_path>/<name>
    json_name: str
    identity: dict[str, Any]
    resources: dict[str, Any]
    settings: RunSettings
    describe: dict[str, Any]  # fixed fields of the exported JSON
    tags: dict[str, str]
    precheck_error: str = ""
    # extra JSON fields computed from the exported weights (their path), before the JSON
    report: Callable[[str], dict[str, Any]] | None = None
    executor: str = "train"  # ray.executor: "train" (Ray Train) or "task" (one Ray task)

    @property
    def directory(self) -> str:
        """The run's directory."""
        return storage.join(self.storage_path, self.name)


def _common(cfg: CampaignConfig, resources: dict[str, Any],
            manifest: dict[str, Any]) -> dict[str, Any]:
    """The :class:`RunSettings` fields experts and the router fill alike."""
    size, channels = model_shape(cfg, manifest)  # the latent shape in latent space
    return {"image_size": size, "channels": channels,
            "latents": manifest.get("latents") or None,
            "use_gpu": resources["gpus_per_worker"] > 0,
            "torch_threads": max(1, int(round(float(resources["cpus_per_worker"])))),
            "gpu_memory_gb": resources.get("gpu_memory_gb"),
            "gpus_per_worker": float(resources["gpus_per_worker"])}


def _latents_describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"latents": record}`` for expert.json / router.json in latent space (the VAE a
    mixture checks), nothing in pixel space."""
    rec = manifest.get("latents")
    return {"latents": rec} if rec else {}


def expert_job(cfg: CampaignConfig, expert: ResolvedExpert, manifest: dict[str, Any]) -> Job:
    """The run of ``expert`` (of the campaign variant ``cfg``)."""
    paths = CampaignPaths(cfg.root)
    identity = expert_identity(cfg, expert, manifest)
    shards = cluster_shards(cfg, manifest, expert.cluster)
    count = int(cluster_info(manifest, expert.cluster)["count"])
    empty = not shards or count == 0
    size, ch = model_shape(cfg, manifest)
    start = expert_start(cfg, expert)
    return Job(
        kind="expert", name=expert_id(cfg, expert, manifest), cluster=expert.cluster,
        objective=expert.objective + (f"/{expert.schedule}" if expert.schedule else ""),
        storage_path=paths.experts, json_name=EXPERT_JSON, identity=identity,
        resources=expert.resources,
        settings=RunSettings(
            kind="expert", train=TrainConfig(**expert.train),
            # how the worker reads its shards (hdd_ray.training.data): memory or stream
            data=data_settings(to_dict(cfg.experts.data)),
            expert=expert, shards=shards, num_samples=count,
            text_features=check_text_features(cfg, manifest, expert.text),
            start={"init": start.init, "mode": start.mode,
                   "network": start.network.as_dict(), "conversion": start.conversion},
            **_common(cfg, expert.resources, manifest)),
        describe={"cluster": expert.cluster, "objective": expert.objective,
                  "schedule": expert.schedule, "architecture": expert.model, "text": expert.text,
                  "image_size": size, "channels": ch, "data_hash": identity["data_hash"],
                  "num_samples": count, "resources": expert.resources,
                  # what its network predicts (read by every velocity field), its modulation,
                  # and where it started: format, path, sha256 and mode (None: scratch)
                  "network": start.network.as_dict(), "adaln": expert.adaln,
                  "conversion": start.conversion,
                  "init": {**start.init, "mode": start.mode} if start.init else None,
                  **_latents_describe(manifest)},
        tags={"kind": "expert", "cluster": str(expert.cluster), "objective": expert.objective},
        executor=cfg.ray.executor,
        precheck_error=(f"cluster {expert.cluster} has no usable data "
                        f"({paths.cluster_dir(expert.cluster)} is empty)") if empty else
        # the memory plan (hdd_ray.training.memory): refused here, before Ray waits for a GPU
        (expert_plan(cfg, expert, (size, ch)).refusal()
         if expert.resources.get("gpu_memory_gb") else ""),
    )


def _grown_router(cfg: CampaignConfig, manifest: dict[str, Any],
                  parent: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[int, list[str]],
                                                   dict[int, int], str]:
    """An incremental router's start (the previous set's router, one output more), its data
    (each old cluster's replay sample, the new cluster whole) and the line refusing it when
    that router is not trained: ``(start, shards, counts, refusal)``."""
    from hdd_ray.prepare.grow import replay_shards

    pid = router_id(with_k(cfg, parent["k"]), parent)
    directory = CampaignPaths(cfg.root).router_dir(pid)
    shards = {c: cluster_shards(cfg, manifest, c) for c in range(cfg.clustering.k)}
    counts = {c: int(cluster_info(manifest, c)["count"]) for c in range(cfg.clustering.k)}
    if not storage.exists(storage.join(directory, ROUTER_JSON)):
        return None, shards, counts, (
            f"router {pid} of the {parent['k']} clusters before is not trained: it is where "
            f"this one starts (router.grow.mode=incremental; or set router.grow.mode=scratch)")
    desc = storage.read_json(storage.join(directory, ROUTER_JSON))
    sha = desc.get("weights_sha256") or file_sha256(storage.join(directory, WEIGHTS))
    for c, (paths, n) in replay_shards(cfg, parent, cfg.router.grow.replay_samples).items():
        shards[c], counts[c] = paths, n
    start = {"init": {"path": directory, "sha256": sha, "grown_from": pid},
             "grow_from": int(parent["k"])}
    return start, shards, counts, ""


def router_job(cfg: CampaignConfig, manifest: dict[str, Any]) -> Job:
    """The router's run; its report is its top-1 accuracy by t, computed in a Ray task with
    its own resources on the exported weights (:func:`hdd_ray.training.reports.router_accuracy`).
    A grown cluster set's incremental router starts from the set before's (``router.grow``)."""
    train, resources = router_train(cfg, manifest), to_dict(cfg.router.resources)
    (size, ch), k = model_shape(cfg, manifest), cfg.clustering.k
    init = ({"path": cfg.router.init, "sha256": describe_router_init(cfg.router.init)}
            if cfg.router.init else None)
    start = {"init": init} if init else None
    shards = {c: cluster_shards(cfg, manifest, c) for c in range(k)}
    counts = {c: int(cluster_info(manifest, c)["count"]) for c in range(k)}
    refusal = ""
    parent = grown_from(cfg, manifest)
    if parent is not None:
        start, shards, counts, refusal = _grown_router(cfg, manifest, parent)
        init = start["init"] if start else None
    return Job(
        kind="router", name=router_id(cfg, manifest), cluster=None, objective="cross-entropy",
        storage_path=CampaignPaths(cfg.root).router, json_name=ROUTER_JSON,
        identity=router_identity(cfg, manifest), resources=resources,
        settings=RunSettings(
            kind="router", train=TrainConfig(**train), data=data_settings(to_dict(cfg.router.data)),
            router_model=cfg.router.model, num_clusters=k,
            cluster_shards=shards, cluster_counts=counts, start=start,
            **_common(cfg, resources, manifest)),
        describe={"architecture": cfg.router.model, "k": k, "image_size": size, "channels": ch,
                  "data_hash": str(manifest["data_hash"]), "init": init,
                  # its cluster set, checked when a mixture loads it (campaign.loading)
                  "clusters": [str(c["hash"]) for c in manifest["clusters"]],
                  **_latents_describe(manifest)},
        tags={"kind": "router"},
        executor=cfg.ray.executor,
        precheck_error=refusal or (router_plan(cfg, (size, ch)).refusal()
                                   if resources.get("gpu_memory_gb") else ""),
        report=lambda weights: {"top1_accuracy_by_t": router_accuracy(cfg, weights, resources)},
    )


def student_job(cfg: CampaignConfig, manifest: dict[str, Any],
                teacher: dict[str, Any]) -> Job:
    """The run of the dense student ``distill`` describes, learning from ``teacher`` (a record
    of :func:`hdd_ray.training.distill.campaign_teacher` or ``folder_teacher``); with
    ``distill.data_weight: 1`` the monolith baseline (data alone, no teacher loaded). Its card
    (``student.json``) records the teacher, and the guidance it samples at (1 for a student:
    the teacher's is distilled in; the teacher's own for the monolith)."""
    from hdd_ray.training.distill import student_plan

    d = cfg.distill
    distilled = float(d.data_weight) < 1
    train, resources = to_dict(d.train), to_dict(d.resources)
    (size, ch), k = model_shape(cfg, manifest), cfg.clustering.k
    model, text = d.model or cfg.experts.model, to_dict(cfg.experts.text)
    network = ResolvedExpert(index=0, cluster=-1, objective="fm_velocity", schedule=None,
                             model=model, text=text, train=train, resources=resources,
                             adaln=cfg.experts.adaln)
    identity = student_identity(cfg, manifest, teacher)
    counts = {c: int(cluster_info(manifest, c)["count"]) for c in range(k)}
    ids = [e["expert_id"] for e in teacher["experts"] if e is not None]
    return Job(
        kind="student", name=student_id(cfg, manifest, teacher), cluster=None,
        objective="distill" if distilled else "monolith",
        storage_path=CampaignPaths(cfg.root).students, json_name=STUDENT_JSON,
        identity=identity, resources=resources,
        settings=RunSettings(
            kind="student", train=TrainConfig(**train), data=data_settings(to_dict(d.data)),
            expert=network, num_clusters=k,
            cluster_shards={c: cluster_shards(cfg, manifest, c) for c in range(k)},
            cluster_counts=counts,
            distill={"data_weight": float(d.data_weight),
                     "teacher": teacher if distilled else None},
            **_common(cfg, resources, manifest)),
        describe={"objective": "fm_velocity", "schedule": None, "architecture": model,
                  "text": text, "adaln": cfg.experts.adaln, "network": None,
                  "image_size": size, "channels": ch, "data_hash": str(manifest["data_hash"]),
                  "num_samples": sum(counts.values()), "resources": resources,
                  "data_weight": float(d.data_weight), "distilled": distilled,
                  "teacher": teacher if distilled else None,
                  "sample_guidance": 1.0 if distilled else float(teacher["guidance"]),
                  "train": train, **_latents_describe(manifest)},
        tags={"kind": "student", "data_weight": f"{float(d.data_weight):g}",
              **({"teacher_experts": ",".join(ids),
                  "teacher_router": teacher["router"]["router_id"],
                  "teacher_assignment": teacher["assignment"],
                  "teacher_routing": teacher["routing"],
                  "teacher_guidance": f"{teacher['guidance']:g}"} if distilled else {})},
        executor=cfg.ray.executor,
        precheck_error=(student_plan(cfg, (size, ch), teacher).refusal()
                        if resources.get("gpu_memory_gb") else ""),
    )
