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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.choices import STRATEGIES, check_routing, format_assignment
from hdd_ray.diffusion.convert import VelocityField
from hdd_ray.errors import MixtureError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig, ResolvedExpert
    from hdd_ray.models.expert import ExpertModel, RouterModel

#: ``router(x_t, t) -> p(k | x_t, t)`` as probabilities ``[B, K]``
RouterFn = Callable[[Tensor, Tensor], Tensor]


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
        )
        return base.override(cfg.clustering.k, **overrides)

    def override(self, num_clusters: int, where: str = "", **values: Any) -> MixtureSpec:
        """This spec with every value of ``values`` that is not ``None`` in place of its field
        (``ddpm_clusters`` sorted), its routing checked for ``num_clusters`` experts by
        :func:`hdd_ray.choices.check_routing`: a one-line ``ConfigError`` whose names ``where``
        prefixes (``"--"`` for a job's flags)."""
        given = {key: value for key, value in values.items() if value is not None}
        if "ddpm_clusters" in given:
            given["ddpm_clusters"] = tuple(sorted(given["ddpm_clusters"]))
        spec = dataclasses.replace(self, **given)
        check_routing(spec.routing, spec.k, spec.threshold, num_clusters, where)
        return spec

    def assignment(self, num_clusters: int) -> str:
        """Readable objective per cluster, e.g. ``D F F D F F F F``."""
        return format_assignment(self.ddpm_clusters, num_clusters)


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

    def weights(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Blend weights ``[B, K]`` at ``(x_t, t)``."""
        return route(self.router(x_t, t), self.strategy, self.k, self.threshold)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        w = self.weights(x_t, t)
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
    """

    def __init__(self, experts: list[tuple[ExpertModel, dict]], router: RouterModel,
                 cfg: CampaignConfig, device: str | torch.device = "cpu") -> None:
        self.experts = experts  # (ExpertModel, expert.json) per cluster, in cluster order
        self.router = router
        self.cfg = cfg
        self.device = torch.device(device)  # where the networks are (load_mixture puts them)
        #: bf16 autocast of every network call on a GPU (``sampling.mixed_precision``)
        self.mixed_precision = getattr(cfg.sampling, "mixed_precision", "no")
        self.last_evaluations: list[int] = [0] * len(experts)

    @property
    def assignment(self) -> str:
        """The objectives per cluster as a readable string, e.g. ``D F F D F F F F``."""
        return " ".join("D" if d["objective"].startswith("ddpm") else "F" for _, d in self.experts)

    def fields(self, prompts: list[str], guidance: float,
               device: str | torch.device) -> list[VelocityField]:
        """Each expert as a guided flow-matching velocity field over ``cond = {"index": [B]}``."""
        from hdd_ray.campaign import expert_objective
        from hdd_ray.diffusion import Safeguards, guided

        safeguards = Safeguards(**dataclasses.asdict(self.cfg.sampling.conversion))
        out = []
        for model, desc in self.experts:
            objective = expert_objective(desc)  # with the network it predicts
            tok = model.tokenize(prompts, device)
            # the captions' token features do not change over the ODE steps: encode them once
            tokens = model.encode_text(tok["ids"], tok["mask"])
            net = network_call(model, device, self.mixed_precision)
            field = guided(objective.velocity_field(net, safeguards, model.prior_mean()), guidance)

            def expert_field(x, t, cond, _f=field, _tokens=tokens, _mask=tok["mask"]):
                idx = cond["index"]
                return _f(x, t, {"tokens": _tokens[idx], "mask": _mask[idx]})

            out.append(expert_field)
        return out

    def router_probs(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``p(k | x_t, t)`` from the router (flow-matching t in [0, 1])."""
        from hdd_ray.diffusion import FM_TIME_SCALE

        with devices.autocast(x_t.device, self.mixed_precision):
            logits = self.router(x_t, t * FM_TIME_SCALE)
        return torch.softmax(logits.float(), dim=1).to(x_t.dtype)

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
        spec = MixtureSpec.from_config(self.cfg).override(
            self.cfg.clustering.k, routing=strategy, k=k, threshold=threshold, guidance=guidance,
            steps=steps)
        device = self.device if device is None else torch.device(device)
        from hdd_ray.latents import to_pixels

        # the experts' input shape: the latent shape in latent space (expert.json)
        desc = self.experts[0][1] if self.experts else {}
        c = int(desc.get("channels", self.cfg.corpus.channels))
        size = int(desc.get("image_size", self.cfg.corpus.image_size))
        latent = bool(desc.get("latents"))
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


def _check_one_vae(manifest: dict, experts: list[tuple[ExpertModel, dict]],
                   wanted: list[tuple[ResolvedExpert, str]]) -> None:
    """Refuse (one line) a mixture whose experts were trained against different VAEs (or
    against another VAE than the campaign's prepared corpus)."""
    from hdd_ray.latents import check_same_vae

    named = [(f"expert {eid}", desc.get("latents"))
             for (_, desc), (_, eid) in zip(experts, wanted, strict=True)]
    check_same_vae([*named, ("the prepared corpus", manifest.get("latents"))])


def load_mixture(cfg: CampaignConfig, ddpm_clusters: Sequence[int] | None = None,
                 device: str | torch.device = "cpu") -> Mixture:
    """Assemble a mixture from the campaign's expert cache and router, its networks on ``device``.

    ``ddpm_clusters`` picks the objective assignment (default: the config's). Every expert it
    needs must already be trained; otherwise one line names the missing ones and the fix.
    """
    from hdd_ray import storage
    from hdd_ray.campaign import (
        EXPERT_JSON,
        CampaignPaths,
        expert_id,
        load_expert,
        load_manifest,
        load_router,
        with_assignment,
    )
    from hdd_ray.config import resolve_experts

    if ddpm_clusters is not None:
        cfg = with_assignment(cfg, ddpm_clusters)
    manifest = load_manifest(cfg)
    paths = CampaignPaths(cfg.root)
    wanted = [(e, expert_id(cfg, e, manifest)) for e in resolve_experts(cfg)]
    missing = [eid for _, eid in wanted
               if not storage.exists(storage.join(paths.expert_dir(eid), EXPERT_JSON))]
    if missing:
        raise MixtureError(
            f"experts not trained yet: {', '.join(missing)} "
            f"(run `python jobs/train_all_experts.py root={cfg.root} ...` with this assignment)"
        )
    experts = []
    for _, eid in wanted:
        model, desc = load_expert(paths.expert_dir(eid))
        experts.append((model.to(device), desc))
    router = load_router(cfg, manifest).to(device)
    _check_one_vae(manifest, experts, wanted)
    return Mixture(experts, router, cfg, device)
