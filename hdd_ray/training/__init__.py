"""Training: one loop (``loop``, told what to train by ``settings.RunSettings``, run through
``hooks``), its checkpoints (``checkpoints``), its data (``data``), and the launcher that runs
every expert and the router as independent runs (``launcher``): what each run is (``jobs``), how
it is executed (``executors``: Ray Train or one Ray task), its export (``export``) and what it
reports after (``reports``).

Stages above training (the sweep) call :func:`train_campaign` from here, not from the launcher
module; it is imported on first use, so ``import hdd_ray.training.loop`` on a Ray worker does not
import the launcher.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train_campaign"]


def __getattr__(name: str) -> Any:
    if name == "train_campaign":
        from hdd_ray.training.launcher import train_campaign

        return train_campaign
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
