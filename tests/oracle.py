"""Analytic optimal predictors for Gaussian-mixture data (float64), for the exactness tests.

For data ``x0 ~ sum_m pi_m N(mu_m, S_m)`` on any affine path ``x = a x0 + b eps`` the
posterior is closed form: ``x | m ~ N(a mu_m, a^2 S_m + b^2 I) =: N(m_m, C_m)`` and

    E[eps | x, m] = b C_m^{-1} (x - a mu_m),   E[x0 | x, m] = mu_m + a S_m C_m^{-1} (x - a mu_m),

mixed with the posterior ``p(m | x)``. The VP path uses ``a = sqrt(abar)``, ``b = sqrt(1 - abar)``;
the flow-matching path ``a = 1 - t``, ``b = t``. These give the optimal ``eps``, ``x0``, VP ``v``
and flow-matching velocity predictors, with no training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hdd_ray.diffusion.schedules import VPSchedule


class GaussianMixture:
    """``sum_m weights[m] N(means[m], covs[m])`` in ``D`` dimensions (float64)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        self.weights = (weights / weights.sum()).to(torch.float64)
        self.means = means.to(torch.float64)
        self.covs = covs.to(torch.float64)
        self.dim = self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of mixture components."""
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``[n, D]`` and their component labels ``[n]``."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], z)
        return x, labels

    def mean(self) -> Tensor:
        """Mean of the mixture."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        """Covariance of the mixture."""
        mu = self.mean()
        d = self.means - mu
        return (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    def _components(self, x: Tensor, a: Tensor, b: Tensor):
        """Per component: log p(x | m) [B, M], E[eps|x,m] and E[x0|x,m] [B, M, D]."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        a2, b2 = (a**2)[:, None, None, None], (b**2)[:, None, None, None]
        cov = a2 * self.covs[None] + b2 * eye  # [B, M, D, D]
        r = x[:, None, :] - a[:, None, None] * self.means[None]  # [B, M, D]
        sol = torch.linalg.solve(cov, r.unsqueeze(-1)).squeeze(-1)  # C^{-1} r
        logdet = torch.linalg.slogdet(cov).logabsdet
        logp = -0.5 * ((r * sol).sum(-1) + logdet + self.dim * math.log(2 * math.pi))
        e_eps = b[:, None, None] * sol
        e_x0 = self.means[None] + a[:, None, None] * torch.einsum("mij,bmj->bmi", self.covs, sol)
        return logp, e_eps, e_x0

    def posterior(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``p(m | x)`` ``[B, M]`` on the path ``x = a x0 + b eps``."""
        logp, _, _ = self._components(x, a, b)
        return torch.softmax(logp + torch.log(self.weights)[None], dim=1)

    def expectations(self, x: Tensor, a: Tensor, b: Tensor, component: int | None = None):
        """``(E[eps | x], E[x0 | x])``, marginal or for one ``component``."""
        logp, e_eps, e_x0 = self._components(x, a, b)
        if component is not None:
            return e_eps[:, component], e_x0[:, component]
        post = torch.softmax(logp + torch.log(self.weights)[None], dim=1)[:, :, None]
        return (post * e_eps).sum(1), (post * e_x0).sum(1)

    # ----------------------------------------------------------------- optimal predictors

    def vp_predictor(self, schedule: VPSchedule, parameterization: str, component: int | None = None):
        """Optimal native VP predictor ``predict(x_in, tau, cond)`` (``eps`` | ``x0`` | ``v``)."""

        def predict(x_in: Tensor, tau: Tensor, cond=None) -> Tensor:
            abar = schedule.alpha_bar(tau.to(torch.float64))
            a, b = abar.sqrt(), (1 - abar).sqrt()
            e_eps, e_x0 = self.expectations(x_in, a, b, component)
            if parameterization == "eps":
                return e_eps
            if parameterization == "x0":
                return e_x0
            if parameterization == "v":
                return a[:, None] * e_eps - b[:, None] * e_x0
            raise ValueError(f"unknown parameterization {parameterization!r}")

        return predict

    def fm_velocity(self, component: int | None = None):
        """Optimal flow-matching velocity ``v(x_t, t, cond) = E[eps - x0 | x_t]``."""

        def field(x_t: Tensor, t: Tensor, cond=None) -> Tensor:
            t = t.to(torch.float64)
            e_eps, e_x0 = self.expectations(x_t, 1 - t, t, component)
            return e_eps - e_x0

        return field

    def fm_posterior(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``p(m | x_t)`` on the flow-matching path (the oracle router)."""
        t = t.to(torch.float64)
        return self.posterior(x_t, 1 - t, t)
