"""Blending experts at inference: routing weights and the mixture velocity field.

Every expert is read as a flow-matching velocity field (``diffusion.as_velocity``); the router
gives ``p(k | x_t, t)``; a routing strategy turns it into blend weights ``w`` and the mixture's
velocity is ``v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t)`` (DDM). With the exact posterior and
exact per-cluster velocities this is the exact velocity of the whole data distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hdd_ray.diffusion.convert import VelocityField

STRATEGIES = ("full", "top1", "topk", "threshold")

#: ``router(x_t, t) -> p(k | x_t, t)`` as probabilities ``[B, K]``
RouterFn = Callable[[Tensor, Tensor], Tensor]


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


def blend(velocities: Tensor | Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_k weights[:, k] * velocities[k]``; ``velocities`` is ``[K, B, ...]`` or a list."""
    v = torch.stack(list(velocities)) if not isinstance(velocities, Tensor) else velocities
    w = weights.transpose(0, 1).reshape(*weights.shape[::-1], *([1] * (v.dim() - 2)))
    return (w.to(v.dtype) * v).sum(dim=0)


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
