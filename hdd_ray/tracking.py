"""MLflow conventions: one experiment per campaign, runs for each stage, nested runs.

The tracking URI is explicit everywhere (Ray workers do not inherit the driver's): the config's
``tracking.uri``, else a sqlite file in the campaign root (``sqlite:///<root>/mlflow.db``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hdd_ray.storage import is_uri


def tracking_uri(cfg: Any) -> str:
    """The MLflow tracking URI of a campaign config."""
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    if is_uri(cfg.root):
        raise ValueError(
            f"tracking.uri=None: set it (e.g. http://127.0.0.1:5000) when root={cfg.root!r} is remote"
        )
    root = os.path.abspath(cfg.root)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def setup(cfg: Any) -> str:
    """Point MLflow at the campaign's store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.set_experiment(cfg.tracking.experiment)
    return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}`` for MLflow params (values stringified, 500 chars max)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


@contextlib.contextmanager
def run(
    cfg: Any,
    name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run of the campaign; no-op when disabled.

    Yields the active ``mlflow.ActiveRun`` or ``None`` when tracking is disabled.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    setup(cfg)
    all_tags = {"campaign": cfg.name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    nested = mlflow.active_run() is not None  # a stage inside the campaign's run
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, tags=all_tags,
                          nested=nested) as active:
        yield active
