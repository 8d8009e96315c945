"""Blending experts at inference: what defines a mixture, routing weights and the mixture
velocity field.

A mixture is defined by a :class:`MixtureSpec` (objective assignment, routing, guidance,
steps), the one reader of these settings from the config and from callers' overrides. Every
expert is read as a flow-matching velocity field (``diffusion.as_velocity``); the router gives
``p(k | x_t, t)``; a routing strategy turns it into blend weights ``w`` and the mixture's
velocity is ``v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t)`` (DDM; :class:`MixtureField` computes
it, each expert only where its weight is not zero). With the exact posterior and exact
per-cluster velocities this is the exact velocity of the whole data distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.choices import STRATEGIES, check_retired, check_routing, format_assignment
from hdd_ray.diffusion.convert import VelocityField
from hdd_ray.errors import MixtureError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.models.expert import ExpertModel, RouterModel
    from hdd_ray.routing import CentroidRouter

#: ``router(x_t, t[, cond]) -> p(k | x_t, t[, prompt])`` as probabilities ``[B, K]``: a router
#: that takes a third argument is given the batch's condition (the prompts' indices: the
#: centroid router routes on the prompt, :mod:`hdd_ray.routing`)
RouterFn = Callable[..., Tensor]


def takes_cond(router: Callable[..., Tensor]) -> bool:
    """Whether ``router`` accepts a third argument (the condition)."""
    import inspect

    try:
        inspect.signature(router).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): called with (x_t, t)
        return False
    return True


@dataclass(frozen=True)
class MixtureSpec:
    """What defines one mixture's samples: the objective assignment (the clusters that use
    ``ddpm_eps``), the routing (strategy, top-``k``, threshold), guidance, ODE steps, how many
    samples an evaluation draws and the noise seed.

    The one reader of these settings: :meth:`from_config` takes the campaign's (``sampling``,
    ``experts.ddpm_clusters``, ``evaluation.num_samples``), :meth:`override` applies a caller's
    (a job's flags, a sweep trial's values) and checks the routing. Every field is hashed into
    the mixture's id (``hdd_ray.evaluation.mixture.mixture_id``).
    """

    ddpm_clusters: tuple[int, ...]
    routing: str
    k: int
    threshold: float | None
    guidance: float
    steps: int
    num_samples: int
    seed: int = 0
    #: clusters whose experts are left out: their routing weight masked, the rest renormalised
    retired: tuple[int, ...] = ()
    #: where the routing probabilities come from (``sampling.router``): ``learned`` or
    #: ``centroid`` (on the prompt, with ``temperature``: :mod:`hdd_ray.routing`)
    router: str = "learned"
    temperature: float | None = None

    @classmethod
    def from_config(cls, cfg: CampaignConfig, ddpm_clusters: Sequence[int] | None = None,
                    **overrides: Any) -> MixtureSpec:
        """The config's mixture (``ddpm_clusters``: another assignment), with ``overrides``
        applied by :meth:`override`."""
        s = cfg.sampling
        base = cls(
            ddpm_clusters=tuple(sorted(cfg.experts.ddpm_clusters if ddpm_clusters is None
                                       else ddpm_clusters)),
            routing=s.routing, k=s.k, threshold=s.threshold, guidance=s.guidance_scale,
            steps=s.steps, num_samples=cfg.evaluation.num_samples, seed=s.seed,
            router=s.router,
            temperature=s.centroid_temperature if s.router == "centroid" else None,
        )
        return base.override(cfg.clustering.k, **overrides)

    def override(self, num_clusters: int, where: str = "", **values: Any) -> MixtureSpec:
        """This spec with every value of ``values`` that is not ``None`` in place of its field
        (``ddpm_clusters`` sorted), its routing checked for ``num_clusters`` experts by
        :func:`hdd_ray.choices.check_routing`: a one-line ``ConfigError`` whose names ``where``
        prefixes (``"--"`` for a job's flags)."""
        given = {key: value for key, value in values.items() if value is not None}
        for key in ("ddpm_clusters", "retired"):
            if key in given:
                given[key] = tuple(sorted({int(c) for c in given[key]}))
        spec = dataclasses.replace(self, **given)
        check_routing(spec.routing, spec.k, spec.threshold, num_clusters, where)
        check_retired(spec.retired, num_clusters, spec.routing, spec.k, where)
        return spec

    def assignment(self, num_clusters: int) -> str:
        """Readable objective per cluster, e.g. ``D F - D F F F F`` (``-``: left out)."""
        return format_assignment(self.ddpm_clusters, num_clusters, self.retired)


def route(probs: Tensor, strategy: str, k: int = 2, threshold: float | None = None) -> Tensor:
    """Blend weights ``[B, K]`` from router probabilities ``[B, K]``.

    * ``full``: ``w = p``;
    * ``top1``: all weight on the most probable expert;
    * ``topk``: the ``k`` most probable experts, renormalised;
    * ``threshold``: experts with ``p >= threshold``, renormalised; the most probable expert is
      always kept, so no row is empty.

    Every row sums to 1 and is zero outside the chosen experts.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, K], got shape {tuple(probs.shape)}")
    n_experts = probs.shape[1]
    probs = probs.clamp_min(0)
    if strategy == "full":
        mask = torch.ones_like(probs, dtype=torch.bool)
    elif strategy in ("top1", "topk"):
        kk = 1 if strategy == "top1" else k
        if not 1 <= kk <= n_experts:
            raise ValueError(f"k={kk}: top-k must be in 1..{n_experts} (number of experts)")
        idx = probs.topk(kk, dim=1).indices
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    elif strategy == "threshold":
        if threshold is None:
            raise ValueError("routing strategy 'threshold' needs a threshold")
        mask = probs >= threshold
        best = probs.argmax(dim=1, keepdim=True)
        mask = mask.scatter(1, best, True)
    else:
        raise ValueError(f"unknown routing strategy {strategy!r}, allowed: {', '.join(STRATEGIES)}")
    w = torch.where(mask, probs, torch.zeros_like(probs))
    total = w.sum(dim=1, keepdim=True)
    # a row whose chosen probabilities are all 0 falls back to uniform over the chosen experts
    uniform = mask.to(probs.dtype) / mask.sum(dim=1, keepdim=True).to(probs.dtype)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(probs.dtype).tiny), uniform)


def network_call(net: Callable[..., Tensor], device: str | torch.device,
                 mixed_precision: str) -> Callable[..., Tensor]:
    """``net(x, time, cond)`` under bf16 autocast on a GPU (``mixed_precision="bf16"``), its
    output cast back to ``x``'s dtype: only the network runs in bf16, while the conversion to a
    velocity, the blending and the ODE steps around it keep float32/float64."""

    def call(x: Tensor, time: Tensor, cond: Any = None) -> Tensor:
        with devices.autocast(device, mixed_precision):
            out = net(x, time, cond)
        return out.to(x.dtype)

    return call


def _index_cond(cond: Any, idx: Tensor) -> Any:
    if cond is None:
        return None
    return {key: value[idx] for key, value in cond.items()}


class MixtureField:
    """The mixture's velocity field with **sparse execution**.

    Each expert is evaluated only on the samples whose weight for it is non-zero, so one call
    with top-k routing costs ``k * B`` expert evaluations rather than ``K * B``.
    ``evaluations[k]`` counts the samples expert ``k`` has been evaluated on.
    """

    def __init__(
        self,
        experts: Sequence[VelocityField],
        router: RouterFn,
        strategy: str = "topk",
        k: int = 2,
        threshold: float | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}, allowed: {', '.join(STRATEGIES)}")
        self.experts = list(experts)
        self.router = router
        self.strategy, self.k, self.threshold = strategy, k, threshold
        self.evaluations = [0] * len(self.experts)
        self.with_cond = takes_cond(router)

    def weights(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Blend weights ``[B, K]`` at ``(x_t, t)`` (and the condition, for a router that
        takes it)."""
        probs = self.router(x_t, t, cond) if self.with_cond else self.router(x_t, t)
        return route(probs, self.strategy, self.k, self.threshold)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        w = self.weights(x_t, t, cond)
        out = torch.zeros_like(x_t)
        for j, field in enumerate(self.experts):
            idx = torch.nonzero(w[:, j] > 0).flatten()
            if idx.numel() == 0:
                continue
            self.evaluations[j] += int(idx.numel())
            v = field(x_t[idx], t[idx], _index_cond(cond, idx))
            wj = w[idx, j].reshape(-1, *([1] * (x_t.dim() - 1))).to(v.dtype)
            out.index_add_(0, idx, (wj * v).to(out.dtype))
        return out


# ------------------------------------------------------------------------------------- mixtures


class Mixture:
    """A campaign's experts (any mix of objectives and schedules) and its router, ready to sample.

    Each expert keeps its own text encoder and tokenizer; the mixture's condition is an index
    into the batch's prompts, so sparse routing can hand each expert just its samples.
    ``router``: the trained router, or the training-free :class:`hdd_ray.routing.CentroidRouter`
    (routing on the prompt); its outputs must be the mixture's clusters.
    """

    def __init__(self, experts: list[tuple[ExpertModel | None, dict]],
                 router: RouterModel | CentroidRouter,
                 cfg: CampaignConfig, device: str | torch.device = "cpu",
                 retired: Sequence[int] = ()) -> None:
        # (ExpertModel, expert.json) per cluster, in cluster order; a retired cluster's model
        # is None (never loaded, never called: its routing weight is zero)
        self.experts = experts
        self.retired = tuple(sorted({int(c) for c in retired}))
        if any(experts[c][0] is not None for c in self.retired) or any(
                m is None for c, (m, _) in enumerate(experts) if c not in self.retired):
            raise ValueError("a retired cluster's model must be None, and only a retired one's")
        outputs = getattr(getattr(router, "net", router), "num_experts", None)
        if outputs is not None and int(outputs) != len(experts):
            raise MixtureError(f"the router has {outputs} outputs but the mixture {len(experts)} "
                               "experts: its cluster set does not match the mixture's")
        self.router = router
        #: the centroid router's weights of the prompts being sampled (set by :meth:`sample`)
        self.prompt_weights: Tensor | None = None
        self.cfg = cfg
        self.device = torch.device(device)  # where the networks are (load_mixture puts them)
        #: bf16 autocast of every network call on a GPU (``sampling.mixed_precision``)
        self.mixed_precision = getattr(cfg.sampling, "mixed_precision", "no")
        self.last_evaluations: list[int] = [0] * len(experts)

    @classmethod
    def from_folder(cls, path: str, device: str | torch.device = "cpu") -> Mixture:
        """A mixture exported to one folder (``jobs/export_mixture.py``), its networks on
        ``device``: every file checked against the folder's sha256 manifest, its towers (a VAE,
        text-tower files) read from the folder's copies or checked by content at their recorded
        paths (:func:`hdd_ray.mixture_folder.read_folder`). Needs no campaign and no tracker;
        a damaged or missing file is a one-line :class:`MixtureError` naming it. Experts the
        exported mixture left out are left out here too."""
        from hdd_ray.mixture_folder import read_folder

        experts, router, cfg = read_folder(path, device)
        retired = [c for c, (model, _) in enumerate(experts) if model is None]
        return cls(experts, router, cfg, device, retired=retired)

    @classmethod
    def from_student(cls, directory: str, cfg: CampaignConfig,
                     device: str | torch.device = "cpu") -> Mixture:
        """A distilled student (``<root>/students/<id>/``, :mod:`hdd_ray.training.distill`) as
        a one-expert mixture on ``device``: its one expert always weighted 1, sampled by
        :meth:`sample` with the campaign's sampler and steps at the student's own guidance
        (1 for a student: the teacher's guidance is distilled in; the teacher's for the
        monolith baseline), so it samples and evaluates through the mixture's code."""
        from hdd_ray.campaign import STUDENT_JSON, load_expert

        model, desc = load_expert(directory, json_name=STUDENT_JSON)
        return cls([(model.to(device), desc)], OneExpertRouter().to(device),
                   student_config(cfg, desc), device)

    @property
    def assignment(self) -> str:
        """The objectives per cluster as a readable string, e.g. ``D F - D F F F F``."""
        return " ".join("-" if c in self.retired else "D" if d["objective"].startswith("ddpm")
                        else "F" for c, (_, d) in enumerate(self.experts))

    def fields(self, prompts: list[str], guidance: float,
               device: str | torch.device) -> list[VelocityField]:
        """Each expert as a guided flow-matching velocity field over ``cond = {"index": [B]}``
        (:func:`expert_field`; a retired cluster's never evaluated)."""
        from hdd_ray.diffusion import Safeguards

        safeguards = Safeguards(**dataclasses.asdict(self.cfg.sampling.conversion))
        return [_retired_field if model is None else
                expert_field(model, desc, prompts, guidance, device, safeguards,
                             self.mixed_precision)
                for model, desc in self.experts]

    def router_probs(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``p(k | x_t, t)`` from the router (flow-matching t in [0, 1]); the centroid router's
        are its prompts' weights (``cond["index"]`` into the prompts being sampled)."""
        logits = None
        if self.prompt_weights is not None:
            if cond is None:
                raise MixtureError("the centroid router routes on the prompt: no prompt given")
            logits = self.prompt_weights.to(x_t.device)[cond["index"]].clamp_min(1e-30).log()
        return router_probs(self.router, x_t, t, self.retired, self.mixed_precision, logits)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seed: int = 0,
        strategy: str | None = None,
        k: int | None = None,
        threshold: float | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        device: str | torch.device | None = None,
    ) -> Tensor:
        """One image per prompt, ``[N, C, H, W]`` in [-1, 1]; seeded per batch, so reproducible.

        The routing, guidance and steps are the config's, each one given here (not ``None``)
        taking its place (:meth:`MixtureSpec.override`, which checks the routing).

        In latent space the experts sample latents, which are decoded through the campaign's
        VAE batch by batch on ``device`` (:func:`hdd_ray.latents.to_pixels`): the result is
        always images at the corpus's size.

        Runs on ``device`` (default: where :func:`load_mixture` put the networks). The starting
        noise is drawn on the CPU and moved, so a seed starts from the same noise on every device.
        """
        from hdd_ray.diffusion import sample_ode

        s = self.cfg.sampling
        spec = MixtureSpec.from_config(self.cfg, retired=self.retired).override(
            self.cfg.clustering.k, routing=strategy, k=k, threshold=threshold, guidance=guidance,
            steps=steps)
        device = self.device if device is None else torch.device(device)
        from hdd_ray.latents import to_pixels

        # the experts' input shape: the latent shape in latent space (expert.json)
        desc = next((d for m, d in self.experts if m is not None), {})
        c = int(desc.get("channels", self.cfg.corpus.channels))
        size = int(desc.get("image_size", self.cfg.corpus.image_size))
        latent = bool(desc.get("latents"))
        from hdd_ray.routing import CentroidRouter

        if isinstance(self.router, CentroidRouter):  # the same weights at every step
            self.prompt_weights = self.router.weights(prompts)
        mix = MixtureField(self.fields(prompts, spec.guidance, device), self.router_probs,
                           strategy=spec.routing, k=spec.k, threshold=spec.threshold)
        out = []
        for start in range(0, len(prompts), s.batch_size):
            n = min(s.batch_size, len(prompts) - start)
            g = devices.generator(seed * 1_000_003 + start)  # CPU: the same noise everywhere
            noise = devices.randn((n, c, size, size), g, device)
            cond = {"index": torch.arange(start, start + n, device=device)}
            x = sample_ode(mix, noise, cond, steps=spec.steps, sampler=s.sampler,
                           shift=s.time_shift)
            # pixels are clamped to the data range; latents are decoded (and clamped) instead
            out.append((to_pixels(self.cfg, x) if latent else x.clamp(-1, 1)).cpu())
        self.last_evaluations = list(mix.evaluations)
        return torch.cat(out)


def expert_field(model: ExpertModel, desc: dict[str, Any], prompts: list[str], guidance: float,
                 device: str | torch.device, safeguards: Any,
                 mixed_precision: str = "no") -> VelocityField:
    """One expert (``expert.json``: ``desc``) as a guided flow-matching velocity field over
    ``cond = {"index": [B]}`` into ``prompts`` (the captions encoded once, by the expert's own
    tokenizer and text encoder); a ``cond["drop"]`` marks samples whose caption is dropped
    (their velocity is the unconditional one). The one way a mixture reads an expert: sampling
    (:meth:`Mixture.fields`) and a distillation teacher (:mod:`hdd_ray.training.distill`)."""
    from hdd_ray.campaign import expert_objective
    from hdd_ray.diffusion import guided

    objective = expert_objective(desc)  # with the network it predicts
    tok = model.tokenize(prompts, device)
    # the captions' token features do not change over the ODE steps: encode them once
    tokens = model.encode_text(tok["ids"], tok["mask"])
    net = network_call(model, device, mixed_precision)
    field = guided(objective.velocity_field(net, safeguards, model.prior_mean()), guidance)

    def indexed(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        idx = cond["index"]
        inner = {"tokens": tokens[idx], "mask": tok["mask"][idx]}
        if "drop" in cond:
            inner["drop"] = cond["drop"]
        return field(x, t, inner)

    return indexed


def router_probs(router: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor,
                 retired: Sequence[int] = (), mixed_precision: str = "no",
                 logits: Tensor | None = None) -> Tensor:
    """``p(k | x_t, t)`` of ``router`` (flow-matching t in [0, 1]) or of ``logits`` (the centroid
    router's log-weights); ``retired`` experts get no weight, the others share it in proportion."""
    from hdd_ray.diffusion import FM_TIME_SCALE

    if logits is None:
        with devices.autocast(x_t.device, mixed_precision):
            logits = router(x_t, t * FM_TIME_SCALE)
    if retired:
        logits = logits.float().index_fill(1, torch.tensor(list(retired), device=logits.device),
                                           float("-inf"))
    return torch.softmax(logits.float(), dim=1).to(x_t.dtype)


def student_config(cfg: CampaignConfig, card: dict[str, Any]) -> CampaignConfig:
    """The campaign as a one-expert mixture of a student (its ``student.json``: ``card``):
    one cluster, top-1 routing, the student's own guidance; sampler, steps and the rest the
    campaign's."""
    return dataclasses.replace(
        cfg, clustering=dataclasses.replace(cfg.clustering, k=1),
        experts=dataclasses.replace(cfg.experts, ddpm_clusters=[]),
        sampling=dataclasses.replace(cfg.sampling, routing="top1", k=1, threshold=None,
                                     guidance_scale=float(card["sample_guidance"])))


class OneExpertRouter(torch.nn.Module):
    """The router of a one-expert mixture (a distilled student): one logit, always chosen."""

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        """Zero logits ``[B, 1]``: probability 1 for the one expert."""
        return x.new_zeros(x.shape[0], 1)


def _retired_field(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    raise RuntimeError("a retired expert was evaluated: its routing weight must be zero")


def _check_one_vae(manifest: dict, experts: list[tuple[ExpertModel, dict]],
                   ids: list[str]) -> None:
    """Refuse (one line) a mixture whose experts were trained against different VAEs (or
    against another VAE than the campaign's prepared corpus)."""
    from hdd_ray.latents import check_same_vae

    named = [(f"expert {eid}", desc.get("latents"))
             for (_, desc), eid in zip(experts, ids, strict=True)]
    check_same_vae([*named, ("the prepared corpus", manifest.get("latents"))])


def trained_experts(cfg: CampaignConfig, manifest: dict,
                    skip: Collection[int] = ()) -> list[tuple[str, str]]:
    """``(expert id, its directory)`` of every cluster's expert of the campaign ``cfg`` (its
    objective assignment), in cluster order. Every one but the ``skip`` clusters' (left out of
    the mixture) must be trained already; otherwise one line (:class:`MixtureError`) names the
    missing ones and the fix."""
    from hdd_ray import storage
    from hdd_ray.campaign import EXPERT_JSON, CampaignPaths, expert_id
    from hdd_ray.config import resolve_experts

    paths = CampaignPaths(cfg.root)
    wanted = [(eid, paths.expert_dir(eid))
              for eid in (expert_id(cfg, e, manifest) for e in resolve_experts(cfg))]
    missing = [eid for c, (eid, d) in enumerate(wanted)
               if c not in skip and not storage.exists(storage.join(d, EXPERT_JSON))]
    if missing:
        raise MixtureError(
            f"experts not trained yet: {', '.join(missing)} "
            f"(run `python jobs/train_all_experts.py root={cfg.root} ...` with this assignment)"
        )
    return wanted


def load_mixture(cfg: CampaignConfig, ddpm_clusters: Sequence[int] | None = None,
                 device: str | torch.device = "cpu", retired: Sequence[int] = ()) -> Mixture:
    """Assemble a mixture from the campaign's expert cache and router, its networks on ``device``.

    ``ddpm_clusters`` picks the objective assignment (default: the config's); ``retired``
    clusters are left out (not loaded, need not be trained; the router's weight for them is
    masked and the rest renormalised). Every expert it needs must already be trained;
    otherwise one line names the missing ones and the fix.
    """
    from hdd_ray.campaign import load_expert, load_manifest, load_router, with_assignment

    if ddpm_clusters is not None:
        cfg = with_assignment(cfg, ddpm_clusters)
    manifest = load_manifest(cfg)
    out = set(retired)
    check_retired(out, cfg.clustering.k, "full", 1)
    wanted = trained_experts(cfg, manifest, skip=out)
    experts: list[tuple[ExpertModel | None, dict]] = []
    for c, (eid, directory) in enumerate(wanted):
        if c in out:  # left out: never loaded (it need not be trained)
            experts.append((None, {"expert_id": eid, "cluster": c, "retired": True}))
            continue
        model, desc = load_expert(directory)
        experts.append((model.to(device), desc))
    if cfg.sampling.router == "centroid":  # training-free: on the prompt (hdd_ray.routing)
        from hdd_ray.routing import load_centroid_router

        router: RouterModel | CentroidRouter = load_centroid_router(cfg, manifest)
    else:
        router = load_router(cfg, manifest).to(device)
    kept = [(x, eid) for c, (x, (eid, _)) in enumerate(zip(experts, wanted, strict=True))
            if c not in out]
    _check_one_vae(manifest, [x for x, _ in kept], [eid for _, eid in kept])
    return Mixture(experts, router, cfg, device, retired=sorted(out))
