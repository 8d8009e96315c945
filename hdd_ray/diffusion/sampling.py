"""ODE sampling in flow-matching time, for any velocity field (one expert or a mixture).

The probability-flow ODE of ``x_t = (1 - t) x0 + t eps`` is ``dx/dt = v(x, t)``; sampling
integrates it from ``t = 1`` (``x ~ N(0, I)``) to ``t = 0``. The time grid is uniform in
``u = 1 - i / N`` and optionally shifted towards noise (SD3's shift ``s``):
``t = s u / (1 + (s - 1) u)``. Heun's method is second order (Euler on the last step, as in
EDM, since it ends at t = 0).

Classifier-free guidance is applied to one expert's field before blending:
``v = v(x, t, null) + w (v(x, t, cond) - v(x, t, null))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hdd_ray.choices import SAMPLERS
from hdd_ray.diffusion.convert import VelocityField


def time_grid(steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> Tensor:
    """``steps + 1`` decreasing times from 1 to 0, shifted by ``shift`` (1 = uniform)."""
    if steps <= 0:
        raise ValueError(f"steps={steps}: must be > 0")
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * u / (1 + (shift - 1) * u)
    return t.to(device=device, dtype=dtype)


@torch.no_grad()
def sample_ode(
    field: VelocityField,
    noise: Tensor,
    cond: Any = None,
    steps: int = 50,
    sampler: str = "euler",
    shift: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = field(x, t, cond)`` from ``t = 1`` (``x = noise``) to ``t = 0``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}, allowed: {', '.join(SAMPLERS)}")
    ts = time_grid(steps, shift, noise.device, noise.dtype)
    x = noise
    batch = noise.shape[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative
        v = field(x, t.expand(batch), cond)
        x_euler = x + dt * v
        if sampler == "heun" and float(t_next) > 0:
            v_next = field(x_euler, t_next.expand(batch), cond)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def null_condition(cond: dict[str, Tensor]) -> dict[str, Tensor]:
    """The unconditional version of a caption batch (every sample's caption dropped)."""
    ref = next(iter(cond.values()))
    return {**cond, "drop": torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)}


def _cat(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def guided(field: VelocityField, scale: float) -> VelocityField:
    """Classifier-free guidance of one field: one batched call on (cond, null) pairs.

    ``scale = 1`` (or ``cond is None``) returns the conditional field unchanged.
    """

    def guided_field(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is None or scale == 1.0:
            return field(x, t, cond)
        null = null_condition(cond)
        if "drop" not in cond:
            cond = {**cond, "drop": torch.zeros_like(null["drop"])}
        v = field(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, null))
        v_c, v_u = v.chunk(2)
        return v_u + scale * (v_c - v_u)

    return guided_field
