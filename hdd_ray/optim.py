"""The one learning-rate schedule of every network this project trains: experts and the router
(:mod:`hdd_ray.training.loop`, ``train.lr_schedule`` and ``train.warmup_steps``) and the demo's
reference CLIP (:mod:`hdd_ray.evaluation.reference_clip`).

A function of the step alone, so a resumed run continues the same schedule. Its numbers are part
of every trained result (an expert's weights, the reference CLIP's cache): change them only with
the caches that depend on them.
"""

from __future__ import annotations

import math

__all__ = ["learning_rate"]


def learning_rate(step: int, lr: float, steps: int, warmup_steps: int = 0,
                  lr_schedule: str = "constant") -> float:
    """The rate at 0-based ``step`` of a run of ``steps`` steps peaking at ``lr``.

    A linear warm-up over the first ``warmup_steps`` steps (``lr * (step + 1) / warmup_steps``),
    then ``lr`` (``constant``) or ``lr * (1 + cos(pi * step / steps)) / 2`` (``cosine``: the
    cosine runs over the whole run, warm-up included, and ends near 0).
    """
    lr, steps, warmup = float(lr), int(steps), int(warmup_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return lr
