"""Per-t velocity error of experts on held-out data: the conversion measured on trained networks.

For held-out images ``x0`` of one cluster, noise ``eps`` and a flow-matching time ``t``, every
velocity field is scored against the flow-matching target at ``x_t = (1 - t) x0 + t eps``::

    mse(t) = mean((v(x_t, t, captions) - (eps - x0))^2)

The same noise is used for every field, so a DDPM expert converted to a velocity (with the new
conversion, the earlier one, or any :class:`~hdd_ray.diffusion.Safeguards`) is compared with its
flow-matching twin from the same cluster point by point. ``evaluation/velocity_error.py`` runs it
on a finished campaign; the curves and their commands are in ``evaluation/README.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.campaign import expert_objective
from hdd_ray.diffusion import Safeguards, guided
from hdd_ray.diffusion.convert import VelocityField

#: flow-matching times of the curves: 0..1 with t = 1 and several points in 0.95..1
T_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99,
          0.995, 0.998, 1.0)

#: the conversion before the edge scheme (the campaigns' setting then), to measure against
BEFORE = Safeguards(beyond_edge="divide", min_one_minus_t=1e-3)


def expert_field(model: Any, desc: Mapping[str, Any], captions: Sequence[str], guidance: float,
                 safeguards: Safeguards | None = None, use_mean: bool = True) -> VelocityField:
    """An exported expert (``campaign.load_expert``'s pair) as a guided velocity field over
    ``cond = {"index": [B]}`` into ``captions``; ``use_mean`` passes its data mean (if any)."""
    objective = expert_objective(desc)
    tok = model.tokenize(list(captions))
    with torch.no_grad():
        tokens = model.encode_text(tok["ids"], tok["mask"])
    mean = model.prior_mean() if use_mean else None
    field = guided(objective.velocity_field(model, safeguards, mean), guidance)

    def indexed(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        idx = cond["index"]
        return field(x, t, {"tokens": tokens[idx], "mask": tok["mask"][idx]})

    return indexed


def expert_curves(fm: tuple[Any, Mapping[str, Any]], ddpm: tuple[Any, Mapping[str, Any]],
                  images: Tensor, captions: Sequence[str], guidances: Sequence[float] = (1.0,),
                  x0_clamp: float | None = None, t_grid: Sequence[float] = T_GRID,
                  draws: int = 4, seed: int = 0) -> list[dict[str, float]]:
    """The curves of one cluster: its FM expert, its DDPM expert converted with the defaults
    (``ddpm``, with its data mean), with the earlier scheme (``ddpm_before``) and, given
    ``x0_clamp``, both with that clamp; one row per (guidance, t)."""
    rows = []
    for guidance in guidances:
        fields = {"fm": expert_field(*fm, captions, guidance),
                  "ddpm": expert_field(*ddpm, captions, guidance, Safeguards()),
                  "ddpm_before": expert_field(*ddpm, captions, guidance, BEFORE)}
        if x0_clamp is not None:
            fields["ddpm_x0_clamp"] = expert_field(
                *ddpm, captions, guidance, Safeguards(x0_clamp=x0_clamp))
            fields["ddpm_before_x0_clamp"] = expert_field(
                *ddpm, captions, guidance, dataclasses.replace(BEFORE, x0_clamp=x0_clamp))
        for row in velocity_errors(fields, images, t_grid, draws, seed):
            rows.append({"guidance": float(guidance), **row})
    return rows


@torch.no_grad()
def velocity_errors(fields: Mapping[str, VelocityField], x0: Tensor,
                    t_grid: Sequence[float] = T_GRID, draws: int = 4, seed: int = 0,
                    batch_size: int = 256) -> list[dict[str, float]]:
    """``[{"t": t, <field name>: mse, ...}]``, one row per ``t`` of ``t_grid``.

    Each of ``x0``'s ``N`` images is noised ``draws`` times per ``t`` (seeded; the same noise for
    every field); the fields get ``cond = {"index": [B]}`` (the image's index, for its caption).
    """
    g = devices.generator(seed)
    n = x0.shape[0]
    index = torch.arange(n).repeat(draws)
    rows = []
    for t_value in t_grid:
        eps = devices.randn((n * draws, *x0.shape[1:]), g, dtype=x0.dtype)
        sums = dict.fromkeys(fields, 0.0)
        for start in range(0, n * draws, batch_size):
            idx = index[start:start + batch_size]
            x, e = x0[idx], eps[start:start + batch_size]
            t = torch.full((idx.numel(),), float(t_value), dtype=x0.dtype)
            x_t = (1 - t_value) * x + t_value * e
            target = e - x
            for name, field in fields.items():
                sums[name] += float(((field(x_t, t, {"index": idx}) - target) ** 2).sum())
        rows.append({"t": float(t_value),
                     **{name: s / (n * draws * x0[0].numel()) for name, s in sums.items()}})
    return rows


def curves_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV text (columns in the first row's order)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def curves_png(rows: Sequence[Mapping[str, Any]], title: str, by: str = "guidance") -> bytes:
    """A log-scale plot of every field's MSE against t, one panel per value of ``by``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r.get(by) for r in rows}, key=lambda v: (v is None, v))
    names = [k for k in rows[0] if k not in ("t", by)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if r.get(by) == group]
        for name in names:
            ax.plot([r["t"] for r in sel], [r[name] for r in sel], marker=".", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("flow-matching t (1 = noise)")
        ax.set_ylabel("MSE against eps - x0")
        ax.set_title(f"{title}, {by} {group}" if group is not None else title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
