"""The "universal translator": any native predictor -> a flow-matching velocity field.

Flow-matching coordinates (the common space of the mixture): ``x_t = (1 - t) x0 + t eps``,
``t`` in [0, 1] (t = 1 is noise), velocity ``v = eps - x0``, so ``x_t = x0 + t v``.

A VP expert (schedule ``abar(tau)``) is queried at the flow-matching state ``(x_t, t)`` by
matching the signal-to-noise ratio. With ``s = sqrt((1 - t)^2 + t^2)``::

    abar* = (1 - t)^2 / s^2,  tau* = abar^{-1}(abar*)        (continuous, not rounded)
    x_in  = x_t / s = sqrt(abar*) x0 + sqrt(1 - abar*) eps   (exactly on the VP path)

and its output is converted (``alpha = (1 - t) / s``, ``sigma = t / s``):

* ``eps``:  ``x0_hat = (x_t - t eps_hat) / (1 - t)``, ``v = eps_hat - x0_hat = (eps_hat - x_t) / (1 - t)``
* ``x0``:   ``v = (x_t - x0_hat) / t``
* ``v`` (VP v-prediction, ``v_vp = alpha eps - sigma x0``): ``eps = alpha v_vp + sigma x_in``,
  ``x0 = alpha x_in - sigma v_vp``, ``v = eps - x0`` (no division: well conditioned everywhere)

With exact (oracle) predictors the result is the exact flow-matching velocity. Near t = 1 the
``eps`` form divides by ``1 - t`` and ``abar*`` falls below the schedule's ``abar(T)``; the
safeguards, each a named config value (``sampling.conversion``), are:

* ``clamp_tau``: clamp ``tau*`` to [0, T] (else it is extrapolated past the schedule),
* ``min_one_minus_t``: use ``max(1 - t, min_one_minus_t)`` as the divisor,
* ``x0_clamp``: clamp the implied ``x0_hat = x_t - t v`` to [-c, c] (the data range) and
  recompute ``v = (x_t - x0_hat) / t`` where the clamp changed it (DDPM's "clip denoised").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hdd_ray.diffusion.schedules import VPSchedule, per_sample

#: ``predict(x_in, tau_or_t, cond) -> native prediction``
Predictor = Callable[[Tensor, Tensor, Any], Tensor]
#: ``v(x_t, t, cond) -> velocity``
VelocityField = Callable[[Tensor, Tensor, Any], Tensor]

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")


@dataclass(frozen=True)
class Safeguards:
    """Numerical safeguards of the conversion near t = 1 (see module docstring)."""

    clamp_tau: bool = True
    min_one_minus_t: float = 1e-3
    x0_clamp: float | None = None


def vp_query(schedule: VPSchedule, x_t: Tensor, t: Tensor, clamp_tau: bool = True) -> tuple[Tensor, Tensor]:
    """SNR matching: the VP input ``x_in`` and continuous timestep ``tau*`` for ``(x_t, t)``."""
    t = t.to(x_t.dtype)
    s = torch.sqrt((1 - t) ** 2 + t**2)
    abar = ((1 - t) / s) ** 2
    tau = schedule.tau_of_alpha_bar(abar, clamp=clamp_tau)
    # per-sample scalars are folded first: one pass over the full tensor
    return x_t * per_sample(s.reciprocal(), x_t), tau


def as_velocity(
    predict: Predictor,
    parameterization: str,
    schedule: VPSchedule | None = None,
    safeguards: Safeguards | None = None,
) -> VelocityField:
    """Turn a native predictor into a flow-matching velocity field ``v(x_t, t, cond)``.

    ``parameterization`` is ``"velocity"`` (a flow-matching expert: ``predict`` is called with
    ``(x_t, t)`` unchanged) or a VP parameterization ``"eps"`` | ``"x0"`` | ``"v"``, which needs
    ``schedule`` and is called with ``(x_in, tau*)``. ``x_t`` is ``[B, ...]``; ``t`` a float
    tensor ``[B]``; the dtype follows the input (float64 works).
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}, allowed: {', '.join(PARAMETERIZATIONS)}"
        )
    g = safeguards or Safeguards()
    if parameterization == "velocity":
        def fm_field(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            return _clamp_x0(predict(x_t, t, cond), x_t, t, g.x0_clamp)

        return fm_field
    if schedule is None:
        raise ValueError(f"parameterization {parameterization!r} needs a VP schedule")

    def vp_field(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = t.to(x_t.dtype)  # the per-sample factors below in the state's precision
        x_in, tau = vp_query(schedule, x_t, t, g.clamp_tau)
        out = predict(x_in, tau, cond)
        # [B] scalars first, then one subtraction and one in-place scaling of the full tensor
        if parameterization == "eps":
            v = (out - x_t).mul_(per_sample((1 - t).clamp_min(g.min_one_minus_t).reciprocal(), x_t))
        elif parameterization == "x0":
            v = (x_t - out).mul_(per_sample(t.clamp_min(g.min_one_minus_t).reciprocal(), x_t))
        else:  # VP v-prediction
            s = torch.sqrt((1 - t) ** 2 + t**2)
            alpha, sigma = (1 - t) / s, t / s
            v = (out * per_sample(alpha + sigma, x_t)).addcmul_(per_sample(sigma - alpha, x_t), x_in)
        return _clamp_x0(v, x_t, t, g.x0_clamp)

    return vp_field


def _clamp_x0(v: Tensor, x_t: Tensor, t: Tensor, c: float | None) -> Tensor:
    if c is None:
        return v
    tb = per_sample(t, x_t)
    # x0 = x_t - t v; where the clamp moves it to x0c, v becomes (x_t - x0c) / t
    # = v + (x0 - x0c) / t, which leaves v bit-for-bit unchanged where x0 was in range
    x0 = torch.addcmul(x_t, tb, v, value=-1)
    excess = x0.sub_(x0.clamp(-c, c))
    return torch.addcdiv(v, excess, tb.clamp_min(1e-12))
