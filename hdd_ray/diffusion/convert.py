"""The "universal translator": any native predictor -> a flow-matching velocity field.

Flow-matching coordinates (the common space of the mixture): ``x_t = (1 - t) x0 + t eps``,
``t`` in [0, 1] (t = 1 is noise), velocity ``v = eps - x0``, so ``x_t = x0 + t v``. Its
square-root signal-to-noise ratio is ``r(t) = (1 - t) / t`` (infinite at t = 0, 0 at t = 1).

**Inside the expert's range.** A VP expert (schedule ``abar(tau)``) is queried at the
flow-matching state ``(x_t, t)`` by matching the signal-to-noise ratio. With
``s = sqrt((1 - t)^2 + t^2)``::

    abar* = (1 - t)^2 / s^2 = r^2 / (1 + r^2),  tau* = abar^{-1}(abar*)   (continuous)
    x_in  = x_t / s = sqrt(abar*) x0 + sqrt(1 - abar*) eps                (exactly on the VP path)

and its output is converted (``alpha = (1 - t) / s``, ``sigma = t / s``):

* ``eps``:  ``x0_hat = (x_t - t eps_hat) / (1 - t)``, ``v = eps_hat - x0_hat = (eps_hat - x_t) / (1 - t)``
* ``x0``:   ``v = (x_t - x0_hat) / t``
* ``v`` (VP v-prediction, ``v_vp = alpha eps - sigma x0``): ``eps = alpha v_vp + sigma x_in``,
  ``x0 = alpha x_in - sigma v_vp``, ``v = eps - x0`` (no division: well conditioned everywhere)

With exact (oracle) predictors the result is the exact flow-matching velocity.

**Beyond the edge** (``beyond_edge="shrink"``, the default). Near t = 1 two things break: the
schedule ends at ``abar(T)`` (the linear schedule's ``abar(T) ~ 4e-5`` is reached at
t ~ 0.994, so ``abar*`` asks for more noise than the expert was trained on), and the ``eps``
form divides by ``1 - t`` (at t = 1 exactly, where every sampling run starts, it is 0 / 0 and an
eps-predictor at SNR 0 carries no information about x0). Each VP expert therefore has an edge
sqrt-SNR ``r_e = max(r_T, r_min)``:

* ``r_T = sqrt(abar(T) / (1 - abar(T)))``, the schedule's end (0 for cosine; only with
  ``clamp_tau``),
* ``r_min = m / (1 - m)`` with ``m = min_one_minus_t`` (``eps`` only: where dividing by
  ``1 - t`` stops being well conditioned).

For ``r >= r_e`` the conversion above is used unchanged (exact). For ``r < r_e`` (t closer to 1,
t = 1 included) the expert is queried *at the edge* (``tau_e = abar^{-1}(r_e^2 / (1 + r_e^2))``,
input ``x_t / s``), its clean-image estimate there is formed,
``x0_e = (x_in - b_e eps_hat) / a_e`` (``eps``), ``x0_hat`` (``x0``) or ``a_e x_in - b_e v_vp``
(``v``) with ``a_e = sqrt(abar_e)``, ``b_e = sqrt(1 - abar_e)``, and shrunk towards the
expert's prior mean ``mu = E[x0]`` (its training data's mean) linearly in the sqrt-SNR::

    x0_hat = mu + (r / r_e) (x0_e - mu),    v = (x_t - x0_hat) / t

At t = 1 this is the exact limit ``v = x_t - E[x0]``; at ``r = r_e`` it equals the inside
formula (continuous). For Gaussian data ``E[x0 | x_t] - mu`` is linear in ``r`` at small ``r``,
so the shrinkage is exact to first order. Without a prior mean the edge estimate is held
(``x0_hat = x0_e``).

``beyond_edge="divide"`` is the earlier scheme, kept to measure against: no edge, ``tau*``
clamped to [0, T] (with ``clamp_tau``), the ``eps`` form divided by ``max(1 - t, m)``.

The safeguards are named config values (``sampling.conversion``), documented on
:class:`Safeguards`. Per-sample factors are folded into ``[B]`` scalars first, so each
conversion makes one pass over the full tensor per term (``v = A x_t + B out [+ C mu]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hdd_ray.choices import BEYOND_EDGE
from hdd_ray.diffusion.schedules import VPSchedule, per_sample

#: ``predict(x_in, tau_or_t, cond) -> native prediction``
Predictor = Callable[[Tensor, Tensor, Any], Tensor]
#: ``v(x_t, t, cond) -> velocity``
VelocityField = Callable[[Tensor, Tensor, Any], Tensor]

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")

_TINY = 1e-12  # keeps a division by t finite at t = 0 exactly (a sampler never asks there)


@dataclass(frozen=True)
class Safeguards:
    """How the conversion behaves near t = 1 (the module docstring has the formulas).

    * ``beyond_edge``: ``"shrink"`` (default) queries a VP expert at its edge sqrt-SNR ``r_e``
      when ``r(t) < r_e`` and shrinks that x0 estimate towards the expert's prior mean (exact at
      t = 1); ``"divide"`` is the earlier scheme (no edge; ``tau*`` clamped, ``eps`` divided by
      ``max(1 - t, min_one_minus_t)``), kept to measure against.
    * ``clamp_tau``: keep the expert's ``tau`` inside its schedule's [0, T]: with ``"shrink"``
      the schedule's end ``r_T`` is part of the edge; ``False`` extrapolates ``tau*`` past T
      (only exact for oracles; the float64 exactness tests use it).
    * ``min_one_minus_t``: ``m``; for ``eps`` experts the edge includes ``r_min = m / (1 - m)``
      (the conversion never divides by ``1 - t < m``); with ``"divide"`` the divisor is
      ``max(1 - t, m)`` (and ``x0`` experts divide by ``max(t, m)``).
    * ``x0_clamp``: clamp the implied ``x0_hat = x_t - t v`` to [-c, c] (the data range) and
      recompute ``v = (x_t - x0_hat) / t`` where the clamp changed it (DDPM's "clip denoised");
      ``None`` = off. Applies to every expert, flow-matching ones included.
    """

    clamp_tau: bool = True
    min_one_minus_t: float = 5e-2
    x0_clamp: float | None = None
    beyond_edge: str = "shrink"


def vp_query(schedule: VPSchedule, x_t: Tensor, t: Tensor, clamp_tau: bool = True) -> tuple[Tensor, Tensor]:
    """SNR matching: the VP input ``x_in`` and continuous timestep ``tau*`` for ``(x_t, t)``."""
    t = t.to(x_t.dtype)
    s = torch.sqrt((1 - t) ** 2 + t**2)
    abar = ((1 - t) / s) ** 2
    tau = schedule.tau_of_alpha_bar(abar, clamp=clamp_tau)
    # per-sample scalars are folded first: one pass over the full tensor
    return x_t * per_sample(s.reciprocal(), x_t), tau


def edge_snr(parameterization: str, schedule: VPSchedule, safeguards: Safeguards) -> float:
    """The edge sqrt-SNR ``r_e`` of a VP expert (0: no edge, the inside formula everywhere)."""
    g = safeguards
    if g.beyond_edge == "divide":
        return 0.0
    r_e = 0.0
    if g.clamp_tau:
        abar_end = float(schedule.alpha_bar(torch.tensor([float(schedule.T)], dtype=torch.float64)))
        r_e = (abar_end / (1 - abar_end)) ** 0.5
    if parameterization == "eps":
        m = g.min_one_minus_t
        r_e = max(r_e, m / (1 - m))
    return r_e


def as_velocity(
    predict: Predictor,
    parameterization: str,
    schedule: VPSchedule | None = None,
    safeguards: Safeguards | None = None,
    prior_mean: Tensor | None = None,
) -> VelocityField:
    """Turn a native predictor into a flow-matching velocity field ``v(x_t, t, cond)``.

    ``parameterization`` is ``"velocity"`` (a flow-matching expert: ``predict`` is called with
    ``(x_t, t)`` unchanged) or a VP parameterization ``"eps"`` | ``"x0"`` | ``"v"``, which needs
    ``schedule`` and is called with ``(x_in, tau)``. ``prior_mean`` is the VP expert's ``E[x0]``
    (its training data's mean, broadcastable to one sample, e.g. ``[C, H, W]``): beyond the edge
    the x0 estimate shrinks towards it (without it, the edge estimate is held); flow-matching
    experts ignore it. ``x_t`` is ``[B, ...]``; ``t`` a float tensor ``[B]``; the dtype follows
    the input (float64 works).
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}, allowed: {', '.join(PARAMETERIZATIONS)}"
        )
    g = safeguards or Safeguards()
    if g.beyond_edge not in BEYOND_EDGE:
        raise ValueError(
            f"unknown beyond_edge {g.beyond_edge!r}, allowed: {', '.join(BEYOND_EDGE)}")
    if parameterization == "velocity":
        def fm_field(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            return _clamp_x0(predict(x_t, t, cond), x_t, t, g.x0_clamp)

        return fm_field
    if schedule is None:
        raise ValueError(f"parameterization {parameterization!r} needs a VP schedule")

    r_e = edge_snr(parameterization, schedule, g)
    abar_e = r_e**2 / (1 + r_e**2)
    a_e, b_e = abar_e**0.5, (1 - abar_e) ** 0.5
    # the edge estimate x0_e = p x_in + q out, per parameterization
    p, q = {"eps": (1 / a_e if a_e > 0 else 0.0, -b_e / a_e if a_e > 0 else 0.0),
            "x0": (0.0, 1.0), "v": (a_e, -b_e)}[parameterization]
    mean = _PriorMean(prior_mean)

    def vp_field(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = t.to(x_t.dtype)  # the [B] factors below in the state's precision
        s = torch.sqrt((1 - t) ** 2 + t**2)
        abar = ((1 - t) / s) ** 2
        beyond = (1 - t) < t * r_e  # r(t) < r_e without dividing by t
        tau = schedule.tau_of_alpha_bar(torch.where(beyond, abar_e, abar), clamp=g.clamp_tau)
        x_in = x_t * per_sample(s.reciprocal(), x_t)
        out = predict(x_in, tau, cond)
        # v = a x_t + b out [+ c mu]: [B] factors first, then one pass per full-tensor term
        if parameterization == "eps":
            inv = (1 - t).clamp_min(g.min_one_minus_t).reciprocal()
            a, b = -inv, inv
        elif parameterization == "x0":
            # t > 0 wherever a sampler asks; "divide" keeps its old floor at min_one_minus_t
            inv = t.clamp_min(g.min_one_minus_t if g.beyond_edge == "divide" else _TINY).reciprocal()
            a, b = inv, -inv
        else:  # VP v-prediction: v = (alpha + sigma) v_vp + (sigma - alpha) x_in
            alpha, sigma = (1 - t) / s, t / s
            a, b = (sigma - alpha) / s, alpha + sigma
        c = None
        if r_e > 0:
            # beyond: x0_hat = mu + k (x0_e - mu), k = r / r_e (1 without a prior mean: hold);
            # the where() never selects the infinities the t = 0 rows produce here
            inv_t = t.reciprocal()
            k = (1 - t) * inv_t / r_e if mean.tensor is not None else torch.ones_like(t)
            a = torch.where(beyond, (1 - k * p / s) * inv_t, a)
            b = torch.where(beyond, -k * q * inv_t, b)
            if mean.tensor is not None:
                c = torch.where(beyond, (k - 1) * inv_t, 0.0)
        v = (out * per_sample(b, x_t)).addcmul_(per_sample(a, x_t), x_t)  # x_t's dtype
        if c is not None:
            v.addcmul_(per_sample(c, x_t), mean.like(x_t))
        return _clamp_x0(v, x_t, t, g.x0_clamp)

    return vp_field


class _PriorMean:
    """A prior mean moved to the state's device and dtype once per (device, dtype)."""

    def __init__(self, tensor: Tensor | None) -> None:
        self.tensor = None if tensor is None else tensor.detach()
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.tensor.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def _clamp_x0(v: Tensor, x_t: Tensor, t: Tensor, c: float | None) -> Tensor:
    if c is None:
        return v
    tb = per_sample(t, x_t)
    # x0 = x_t - t v; where the clamp moves it to x0c, v becomes (x_t - x0c) / t
    # = v + (x0 - x0c) / t, which leaves v bit-for-bit unchanged where x0 was in range
    x0 = torch.addcmul(x_t, tb, v, value=-1)
    # in place at sampling; out of place inside a loss (clamp's backward needs x0)
    excess = x0 - x0.clamp(-c, c) if x0.requires_grad else x0.sub_(x0.clamp(-c, c))
    return torch.addcdiv(v, excess, tb.clamp_min(_TINY))
