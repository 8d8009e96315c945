"""Variance-preserving noise schedules with a continuous ``alpha_bar(tau)``, ``tau`` in [0, T].

A VP schedule defines ``x = sqrt(abar(tau)) x0 + sqrt(1 - abar(tau)) eps``. The DDPM papers use
integer steps; hdd_ray trains and queries ``ddpm_eps`` experts at *continuous* ``tau`` so that the
conversion to flow-matching time (``convert.py``) can hit the SNR it needs exactly.
All arithmetic runs in float64 and is cast back to the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class VPSchedule:
    """Base class: ``alpha_bar(tau)`` and its inverse, both on float tensors."""

    name: str = "vp"

    def __init__(self, T: int = 1000) -> None:
        if T <= 0:
            raise ValueError(f"T={T}: must be > 0")
        self.T = int(T)

    def alpha_bar(self, tau: Tensor) -> Tensor:
        """Cumulative signal fraction ``abar(tau)`` for float ``tau`` (0 = clean, T = noisiest)."""
        raise NotImplementedError

    def tau_of_alpha_bar(self, abar: Tensor, clamp: bool = True) -> Tensor:
        """Inverse of :meth:`alpha_bar`; ``clamp`` keeps the result inside [0, T]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


def per_sample(t: Tensor, x: Tensor) -> Tensor:
    """Per-sample scalars ``t`` (shape ``(B,)``) shaped ``(B, 1, ..., 1)`` to broadcast over
    ``x``'s batch, in ``x``'s dtype."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation on increasing knots, extrapolating the end segments."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


class LinearSchedule(VPSchedule):
    """DDPM's linear betas (Ho et al. 2020): ``beta_n`` from ``beta_start`` to ``beta_end``.

    ``abar(n) = prod_{i<=n} (1 - beta_i)`` at the integer knots n = 0..T (abar(0) = 1), and
    ``log abar`` is interpolated linearly in between, so ``abar`` is continuous and strictly
    decreasing, and its inverse is exact (piecewise linear in ``log abar``).
    """

    name = "linear"

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__(T)
        betas = torch.linspace(beta_start, beta_end, self.T, dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        log_abar = torch.cat([zero, torch.cumsum(torch.log1p(-betas), 0)])
        self._knots = torch.arange(self.T + 1, dtype=torch.float64)
        self._neg_log_abar = -log_abar  # increasing in tau
        #: the two tables on each device they were asked on: copied once, not at every step
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self._knots.to(device), self._neg_log_abar.to(device))
        return self._on[device]

    def alpha_bar(self, tau: Tensor) -> Tensor:
        t64 = tau.to(torch.float64)
        knots, nla = self._tables(t64.device)
        return torch.exp(-_interp(t64, knots, nla)).to(_out_dtype(tau))

    def tau_of_alpha_bar(self, abar: Tensor, clamp: bool = True) -> Tensor:
        a64 = abar.to(torch.float64)
        knots, nla = self._tables(a64.device)
        tau = _interp(-torch.log(a64), nla, knots)
        if clamp:
            tau = tau.clamp(0.0, float(self.T))
        return tau.to(_out_dtype(abar))


class CosineSchedule(VPSchedule):
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), continuous in ``tau``.

    ``abar(tau) = f(tau) / f(0)``, ``f(tau) = cos^2(((tau / T) + s) / (1 + s) * pi / 2)``; the
    inverse is closed-form. ``abar(T) = 0`` exactly (pure noise).
    """

    name = "cosine"

    def __init__(self, T: int = 1000, s: float = 0.008) -> None:
        super().__init__(T)
        self.s = float(s)
        self._f0 = math.cos(self.s / (1 + self.s) * math.pi / 2) ** 2

    def alpha_bar(self, tau: Tensor) -> Tensor:
        t64 = tau.to(torch.float64)
        f = torch.cos((t64 / self.T + self.s) / (1 + self.s) * math.pi / 2) ** 2
        return (f / self._f0).to(_out_dtype(tau))

    def tau_of_alpha_bar(self, abar: Tensor, clamp: bool = True) -> Tensor:
        a64 = abar.to(torch.float64).clamp(0.0, 1.0)
        u = torch.arccos(torch.sqrt(a64 * self._f0)) * 2 / math.pi
        tau = self.T * (u * (1 + self.s) - self.s)
        if clamp:
            tau = tau.clamp(0.0, float(self.T))
        return tau.to(_out_dtype(abar))


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


SCHEDULES: dict[str, type[VPSchedule]] = {"linear": LinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str, T: int = 1000) -> VPSchedule:
    """The VP schedule called ``name`` (``linear`` | ``cosine``) with ``T`` steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](T)
