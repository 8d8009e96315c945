"""Distilling a mixture into one dense student: the teacher and the training task.

A mixture is expensive to serve (top-2 routing runs two guided experts and the router at every
ODE step, and all K experts must be loaded). Decentralized Diffusion Models distil their
ensemble into one dense model; here the teacher is the heterogeneous mixture itself, every
expert converted into the flow-matching velocity space exactly as sampling converts it.

**The teacher signal.** At a training sample's ``x_t`` (the student's flow-matching draw: time,
noise and caption dropout as an ``fm_velocity`` expert draws them) the teacher is the mixture's
routed, guided velocity: :class:`Teacher` builds the same :class:`~hdd_ray.ensemble.MixtureField`
over the same :func:`~hdd_ray.ensemble.expert_field` and :func:`~hdd_ray.ensemble.router_probs`
that :meth:`~hdd_ray.ensemble.Mixture.sample` builds, with the mixture's routing, guidance and
conversion settings (recorded in the student's card and id), so the target is the velocity
sampling would follow at that point (``tests/test_distill.py`` checks it). The student learns
it with the flow-matching loss, conditioned on the caption, and samples at guidance 1: the
guidance is distilled in. A sample whose caption is dropped (``train.caption_dropout``) learns
the teacher's unconditional velocity. ``distill.data_weight`` mixes in the data target
``eps - x0``: ``w (eps - x0) + (1 - w) v_teacher``; at ``w = 1`` no teacher is built at all (the
monolith baseline, the same job).

**How the teacher runs.** In the student's own worker, under ``no_grad``, each network call
under bf16 autocast on a GPU (fp32 on the CPU), exactly as sampling runs it: the conversion, the
blending and guidance's arithmetic in float32. Only the experts the router selects for the batch
are evaluated (sparse execution), and each expert is loaded from its run directory the first
time the router selects it (then kept on the worker's device). The memory plan
(:mod:`hdd_ray.training.memory`) counts every expert's and the router's weights (each may be
selected) and one guided forward.

**Online, not cached.** Teacher outputs are computed at every step, not cached: the target
depends on the continuous draw ``(x0, t, eps)``, which never repeats, so a cache could only
hold a fixed finite set of draws (the student would see the same noise every epoch, a weaker
signal than fresh draws), and it would cost ``C x H x W`` floats per draw on disk and a pass of
its own before training. Online, a step costs the teacher ~2 guided expert forwards (4 network
calls with top-2) beside the student's forward and backward (~3 forward's worth): about twice
an expert's step at equal size, with no storage and nothing to invalidate when the routing or
guidance changes. The data is the union of the clusters' shards, read through the experts' own
data path (:mod:`hdd_ray.training.data`: bounded memory when streamed), each sample with its
caption as the experts see it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hdd_ray.devices import TrainingStreams
from hdd_ray.diffusion import NoisedBatch, get_objective
from hdd_ray.models.expert import ExpertModel
from hdd_ray.training.data import BatchSource
from hdd_ray.training.memory import Network, expert_network, router_network
from hdd_ray.training.settings import RunSettings
from hdd_ray.training.speed import unwrap

if TYPE_CHECKING:
    from hdd_ray.ensemble import Mixture, MixtureSpec

__all__ = ["DistillTask", "Teacher", "student_network"]

#: ``() -> (the expert's network, its card)``: loads an expert when the router first selects it
ExpertLoader = Callable[[], tuple[ExpertModel, dict[str, Any]]]


class Teacher:
    """A mixture's routed, guided velocity at any ``(x_t, t)``: the distillation target.

    ``experts``: one loader per cluster (``None``: left out of the mixture), called the first
    time the router gives the expert a weight; ``router``: its network (``p(k | x_t, t)`` through
    :func:`hdd_ray.ensemble.router_probs`). ``loaded`` lists the clusters loaded so far,
    ``evaluations`` the samples each expert has been evaluated on.
    """

    def __init__(self, experts: list[ExpertLoader | None], router: nn.Module, routing: str,
                 k: int, threshold: float | None, guidance: float, safeguards: Any,
                 mixed_precision: str = "bf16") -> None:
        self._loaders = experts
        self._models: dict[int, tuple[ExpertModel, dict[str, Any]]] = {}
        self.router = router.eval().requires_grad_(False)
        self.routing, self.k, self.threshold = routing, k, threshold
        self.guidance, self.safeguards = float(guidance), safeguards
        self.mixed_precision = mixed_precision
        self.retired = tuple(c for c, loader in enumerate(experts) if loader is None)
        self.evaluations = [0] * len(experts)

    @classmethod
    def from_mixture(cls, mixture: Mixture, spec: MixtureSpec) -> Teacher:
        """The teacher of a loaded mixture (its networks as loaded), with ``spec``'s routing
        and guidance and the mixture's conversion settings and precision."""
        from hdd_ray.diffusion import Safeguards

        loaders: list[ExpertLoader | None] = [
            None if model is None else (lambda m=model, d=desc: (m, d))
            for model, desc in mixture.experts]
        safeguards = Safeguards(**dataclasses.asdict(mixture.cfg.sampling.conversion))
        return cls(loaders, mixture.router, spec.routing, spec.k, spec.threshold, spec.guidance,
                   safeguards, mixture.mixed_precision)

    @classmethod
    def from_record(cls, teacher: dict[str, Any], image_size: int, channels: int) -> Teacher:
        """The teacher a run's settings describe (:func:`campaign_teacher`, :func:`folder_teacher`):
        a campaign's experts loaded lazily from their run directories, or a mixture folder's
        (loaded whole, checked file by file, :meth:`~hdd_ray.ensemble.Mixture.from_folder`)."""
        from hdd_ray.diffusion import Safeguards

        safeguards = Safeguards(**teacher["conversion"])
        if teacher.get("folder"):
            from hdd_ray.ensemble import Mixture

            mixture = Mixture.from_folder(teacher["folder"])
            loaders: list[ExpertLoader | None] = [
                None if model is None else (lambda m=model, d=desc: (m, d))
                for model, desc in mixture.experts]
            router: nn.Module = mixture.router
        else:
            from hdd_ray.campaign import load_expert
            from hdd_ray.models.expert import RouterModel, load_weights

            loaders = [None if e is None else (lambda d=e["directory"]: load_expert(d))
                       for e in teacher["experts"]]
            r = teacher["router"]
            router = RouterModel(r["model"], image_size, channels, len(teacher["experts"]))
            load_weights(router, r["path"], f"router {r['router_id']}")
        return cls(loaders, router, teacher["routing"], int(teacher["k"]), teacher["threshold"],
                   float(teacher["guidance"]), safeguards, teacher["mixed_precision"])

    @property
    def loaded(self) -> list[int]:
        """The clusters whose experts are loaded (those the router has selected so far)."""
        return sorted(self._models)

    def _expert(self, cluster: int, device: torch.device) -> tuple[ExpertModel, dict[str, Any]]:
        if cluster not in self._models:
            loader = self._loaders[cluster]
            if loader is None:
                raise RuntimeError(f"expert {cluster} is left out of the teacher: never selected")
            model, desc = loader()
            self._models[cluster] = (model.to(device).eval().requires_grad_(False), desc)
        return self._models[cluster]

    @torch.no_grad()
    def velocity(self, x_t: Tensor, t: Tensor, captions: list[str],
                 drop: Tensor | None = None) -> Tensor:
        """The mixture's velocity at ``(x_t, t)`` (flow-matching ``t`` in [0, 1], ``[B]``) for
        ``captions``; ``drop`` marks samples whose caption is dropped (their unconditional
        velocity, blended by the same routing)."""
        from hdd_ray.ensemble import MixtureField, expert_field, router_probs

        device = x_t.device
        self.router.to(device)

        def lazy(cluster: int) -> Callable[[Tensor, Tensor, Any], Tensor]:
            def field(x: Tensor, tt: Tensor, cond: Any) -> Tensor:
                model, desc = self._expert(cluster, device)
                return expert_field(model, desc, captions, self.guidance, device,
                                    self.safeguards, self.mixed_precision)(x, tt, cond)
            return field

        mix = MixtureField(
            [lazy(c) for c in range(len(self._loaders))],
            lambda x, tt: router_probs(self.router, x, tt, self.retired, self.mixed_precision),
            self.routing, self.k, self.threshold)
        cond: dict[str, Tensor] = {"index": torch.arange(x_t.shape[0], device=device)}
        if drop is not None:
            cond["drop"] = drop
        out = mix(x_t, t, cond)
        self.evaluations = [a + b for a, b in zip(self.evaluations, mix.evaluations, strict=True)]
        return out


class DistillTask:
    """A dense student: every cluster's data (one pool, natural frequencies, each sample with
    its caption), noised on the flow-matching path, its target the teacher's velocity mixed with
    the data's by ``distill.data_weight`` (module docstring). The loop trains it like an expert
    (:mod:`hdd_ray.training.loop`: checkpoints, resume, DDP, executors, MLflow)."""

    data: BatchSource
    network: Network

    def __init__(self, settings: RunSettings, rank: int = 0, world: int = 1,
                 pin_memory: bool = False, fresh: bool = True) -> None:
        spec, distill = settings.expert, settings.distill
        if spec is None or distill is None:
            raise ValueError("a student run needs its network and teacher (RunSettings.expert, "
                             "RunSettings.distill)")
        self.train = settings.train
        self.objective = get_objective("fm_velocity", None, self.train.timestep_sampling)
        self.model = ExpertModel(spec.model, spec.text, settings.image_size, settings.channels,
                                 adaln=spec.adaln)
        if self.train.caption_dropout <= 0:  # never used: not trained (as an expert's)
            self.model.net.y_null.requires_grad_(False)
        self.model.net.activation_checkpointing = bool(self.train.activation_checkpointing)
        self.data_weight = float(distill["data_weight"])
        record = distill.get("teacher")
        self.teacher = (Teacher.from_record(record, settings.image_size, settings.channels)
                        if record is not None and self.data_weight < 1 else None)
        self.network = student_network(spec.model, spec.text, settings.image_size,
                                       settings.channels, record if self.teacher else None)
        self.data = settings.open_data(*settings.every_cluster(), rank, world, pin_memory)
        if not self.data.streaming:  # the student's prior E[x0]: the whole data's mean
            self.model.set_data_mean(self.data.mean()[None])

    def close(self) -> None:
        """Stop the data source's background work."""
        self.data.close()

    def draw(self, model: nn.Module, batch_size: int, rng: TrainingStreams,
             device: torch.device) -> NoisedBatch:
        """The next batch noised on the flow-matching path, its target the teacher's velocity
        at the drawn ``x_t`` (mixed with ``eps - x0`` by the data weight)."""
        x0, captions, _ = self.data.next_batch(batch_size, rng.data)
        inner = unwrap(model)  # under the compile fallback, torch.compile and DDP
        if self.data.streaming:
            inner.set_data_mean(self.data.mean()[None])
        cond = inner.tokenize(captions, device)
        batch = self.objective.draw(x0.to(device, non_blocking=True), cond,
                                    self.train.caption_dropout, rng.noise, inner.prior_mean())
        if self.teacher is None:
            return batch
        drop = (batch.cond or {}).get("drop")
        v = self.teacher.velocity(batch.x, batch.time, list(captions), drop).to(batch.target)
        w = self.data_weight
        target = v if w == 0 else w * batch.target + (1 - w) * v
        return dataclasses.replace(batch, target=target)


def student_network(model: str, text: dict[str, Any], image_size: int, channels: int,
                    teacher: dict[str, Any] | None) -> Network:
    """The student's :class:`~hdd_ray.training.memory.Network` for the memory plan, with its
    teacher's networks (every expert of the mixture and the router; none for the monolith)."""
    net = expert_network(model, text, image_size, channels)
    if not teacher:
        return net
    experts = [expert_network(e["architecture"], e["text"], image_size, channels)
               for e in teacher["experts"] if e is not None]
    router = router_network(teacher["router"]["model"], image_size, channels,
                            len(teacher["experts"]))
    return dataclasses.replace(net, teacher=(*experts, router))


# ----------------------------------------------------------------------------- on the driver


def _spec_fields(spec: MixtureSpec, sampling: Any) -> dict[str, Any]:
    """The mixture's routing, guidance, conversion and sampler settings, as a record holds
    them (``sampling``: the config's section the mixture samples by)."""
    return {"routing": spec.routing, "k": int(spec.k), "threshold": spec.threshold,
            "guidance": float(spec.guidance), "retired": list(spec.retired),
            "conversion": dataclasses.asdict(sampling.conversion),
            "sampler": {"sampler": sampling.sampler, "steps": int(spec.steps),
                        "time_shift": float(sampling.time_shift)},
            # the teacher's network calls as sampling makes them (bf16 autocast on a GPU when
            # sampling.mixed_precision is bf16; fp32 on the CPU)
            "mixed_precision": str(sampling.mixed_precision)}


def _expert_entry(expert_id: str, directory: str, desc: dict[str, Any]) -> dict[str, Any]:
    return {"expert_id": expert_id, "directory": directory, "objective": desc["objective"],
            "architecture": desc["architecture"], "text": desc["text"]}


def campaign_teacher(cfg: Any, spec: MixtureSpec, manifest: dict[str, Any],
                     sweep: str | None = None) -> dict[str, Any]:
    """The record of a campaign's mixture as a teacher (``cfg``: the campaign with the
    mixture's assignment; ``sweep``: the sweep whose best it is): its experts (id, run
    directory, architecture), router and settings. Every expert it uses and the router must be
    trained: one line (:class:`~hdd_ray.errors.MixtureError` / ``CampaignError``) otherwise."""
    from hdd_ray import storage
    from hdd_ray.campaign import EXPERT_JSON, ROUTER_JSON, WEIGHTS, CampaignPaths, router_id
    from hdd_ray.ensemble import trained_experts
    from hdd_ray.errors import CampaignError, MixtureError

    if "centroid" in (spec.router, cfg.sampling.router):
        raise MixtureError("sampling.router=centroid: a teacher routes with the learned router "
                           "(the centroid router reads the prompt, which the student's noisy "
                           "inputs do not carry); distil with sampling.router=learned")
    experts: list[dict[str, Any] | None] = []
    for c, (eid, directory) in enumerate(trained_experts(cfg, manifest, skip=spec.retired)):
        experts.append(None if c in spec.retired else _expert_entry(
            eid, directory, storage.read_json(storage.join(directory, EXPERT_JSON))))
    rid = router_id(cfg, manifest)
    rdir = CampaignPaths(cfg.root).router_dir(rid)
    if not storage.exists(storage.join(rdir, ROUTER_JSON)):
        raise CampaignError(f"router {rid} not trained yet: run `python jobs/train_all_experts.py "
                            f"root={cfg.root}` first")
    return {"source": "sweep" if sweep else "campaign", "sweep": sweep, "folder": None,
            "assignment": spec.assignment(cfg.clustering.k), "experts": experts,
            "router": {"router_id": rid, "path": storage.join(rdir, WEIGHTS),
                       "model": cfg.router.model},
            **_spec_fields(spec, cfg.sampling)}


def folder_teacher(path: str, k: int) -> dict[str, Any]:
    """The record of an exported mixture folder (``jobs/export_mixture.py``) as a teacher: its
    own experts, router and settings; its ``k`` clusters must be the campaign's (one line)."""
    import os

    from hdd_ray import storage
    from hdd_ray.campaign import EXPERT_JSON, ROUTER_JSON
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.errors import MixtureError
    from hdd_ray.mixture_folder import folder_config, read_mixture

    folder = os.path.abspath(os.path.expanduser(path))
    described = read_mixture(folder)
    cfg = folder_config(folder, described)
    if cfg.clustering.k != k:
        raise MixtureError(f"--mixture-dir {path}: a mixture of {cfg.clustering.k} experts, "
                           f"the campaign has clustering.k={k}")
    spec = MixtureSpec.from_config(cfg, retired=described["spec"].get("retired"))
    experts: list[dict[str, Any] | None] = [None] * k
    for entry in described["experts"]:
        directory = os.path.join(folder, entry["folder"])
        experts[int(entry["cluster"])] = _expert_entry(
            entry["expert_id"], directory, storage.read_json(os.path.join(directory, EXPERT_JSON)))
    router = storage.read_json(os.path.join(folder, described["router"]["folder"], ROUTER_JSON))
    return {"source": "folder", "sweep": None, "folder": folder,
            "assignment": spec.assignment(k), "experts": experts,
            "router": {"router_id": router["router_id"], "path": None,
                       "model": router["architecture"]},
            **_spec_fields(spec, cfg.sampling)}


def student_plan(cfg: Any, shape: tuple[int, int], teacher: dict[str, Any] | None,
                 gpu_memory_gb: float | None = None) -> Any:
    """The student's memory plan (:func:`hdd_ray.training.memory.plan_run`) on inputs of
    ``shape``, its teacher's networks counted (none for the monolith baseline)."""
    from hdd_ray.config import to_dict
    from hdd_ray.training.memory import plan_run

    d = cfg.distill
    net = student_network(d.model or cfg.experts.model, to_dict(cfg.experts.text), *shape,
                          teacher if float(d.data_weight) < 1 else None)
    return plan_run(net, to_dict(d.train), to_dict(d.resources), gpu_memory_gb,
                    what="student", memory_key="distill.resources.gpu_memory_gb",
                    train_key="distill.train")
