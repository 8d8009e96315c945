"""A run's checkpoints, as either executor writes them, and the readers of both.

* Ray Train's (``ray.executor: train``): ``<run>/checkpoint_<time>/state.pt``, registered in
  ``<run>/checkpoint_manager_snapshot.json`` (:data:`RAY_TRAIN_SNAPSHOT`) with the metrics
  reported with it; read here, never written (Ray Train writes them).
* The task executor's (``ray.executor: task``): ``<run>/checkpoint_task/state.pt`` and
  ``metrics.json``, each replaced atomically, the state first (:func:`write_task_checkpoint`).

A run resumes from the newest of the two (:func:`newest_state`), so switching ``ray.executor``
loses no step; the launcher's progress lines read the newest one's metrics
(:func:`latest_checkpoint_metrics`). Files go through :mod:`hdd_ray.storage` (a local path or a
bucket, like Ray Train's storage).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from hdd_ray import storage

log = logging.getLogger(__name__)

__all__ = ["RAY_TRAIN_SNAPSHOT", "STATE_FILE", "TASK_CHECKPOINT", "TASK_METRICS",
           "latest_checkpoint_metrics", "latest_checkpoint_step", "newest_state", "other_state",
           "ray_train_checkpoint_metrics", "ray_train_state", "result_state",
           "task_checkpoint_metrics", "task_checkpoint_state", "write_task_checkpoint"]

#: a checkpoint's state (model, EMA, optimizer, step, generators, data positions)
STATE_FILE = "state.pt"
#: the task executor's checkpoint in a run directory (``ray.executor: task``): ``state.pt`` and
#: the metrics reported with it, each file replaced atomically
TASK_CHECKPOINT = "checkpoint_task"
TASK_METRICS = "metrics.json"
#: Ray Train's record of a run's registered checkpoints (read, never written, here)
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _load_state_file(path: str) -> dict[str, Any] | None:
    if not storage.exists(path):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def other_state(load: Callable[[], dict[str, Any] | None], what: str) -> dict[str, Any] | None:
    """A checkpoint state of the other executor, or ``None`` with a warning when it cannot be
    read: a damaged one must not stop a run that has its own (or can start over)."""
    try:
        return load()
    except Exception as exc:
        log.warning("%s: unreadable, not resumed from: %s", what, str(exc).splitlines()[0][:200])
        return None


def newest_state(*states: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint state with the highest ``step`` among ``states`` (``None`` when none)."""
    found = [s for s in states if s is not None]
    return max(found, key=lambda s: int(s["step"])) if found else None


# ------------------------------------------------------------------------------- task executor


def task_checkpoint_metrics(run_directory: str) -> dict[str, Any] | None:
    """The metrics (``step``, ``loss``, ...) of a run's task-executor checkpoint, or ``None``."""
    try:
        return dict(storage.read_json(storage.join(run_directory, TASK_CHECKPOINT, TASK_METRICS)))
    except Exception:
        return None


def task_checkpoint_state(run_directory: str) -> dict[str, Any] | None:
    """The state of a run's task-executor checkpoint, or ``None``."""
    return _load_state_file(storage.join(run_directory, TASK_CHECKPOINT, STATE_FILE))


def write_task_checkpoint(run_directory: str, state: dict[str, Any],
                          metrics: dict[str, Any]) -> None:
    """Write ``state`` then ``metrics`` into ``<run_directory>/checkpoint_task/``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # the state first: metrics never announce a step whose state is not written yet
    storage.write_bytes(storage.join(run_directory, TASK_CHECKPOINT, STATE_FILE),
                        buffer.getbuffer())
    storage.write_json(storage.join(run_directory, TASK_CHECKPOINT, TASK_METRICS), metrics)


# ---------------------------------------------------------------------------------- Ray Train


def _ray_train_latest(run_directory: str) -> dict[str, Any] | None:
    """Ray Train's record of a run's latest registered checkpoint (its directory name and the
    metrics reported with it), or ``None``."""
    try:
        snap = storage.read_json(storage.join(run_directory, RAY_TRAIN_SNAPSHOT))
        return dict(snap["latest_checkpoint_result"])
    except Exception:
        return None


def ray_train_checkpoint_metrics(run_directory: str) -> dict[str, Any] | None:
    """The metrics reported with a run's latest registered Ray Train checkpoint, or ``None``."""
    latest = _ray_train_latest(run_directory)
    try:
        return dict(latest["metrics"]) if latest else None
    except (KeyError, TypeError, ValueError):
        return None


def ray_train_state(run_directory: str) -> dict[str, Any] | None:
    """The state of a run's latest registered Ray Train checkpoint, or ``None``."""
    latest = _ray_train_latest(run_directory)
    if not latest or "checkpoint_dir_name" not in latest:
        return None
    return _load_state_file(storage.join(run_directory, str(latest["checkpoint_dir_name"]),
                                         STATE_FILE))


def result_state(result: Any) -> dict[str, Any]:
    """The state of a finished Ray Train ``Result``'s checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError("the run ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------- either one


def latest_checkpoint_metrics(directory: str) -> dict[str, Any] | None:
    """The metrics (``step``, ``loss``, ``steps_per_s``) reported with a run's newest
    checkpoint, Ray Train's (``checkpoint_manager_snapshot.json``) or the task executor's
    (``checkpoint_task/metrics.json``), or ``None``."""
    found = [m for m in (ray_train_checkpoint_metrics(directory),
                         task_checkpoint_metrics(directory)) if m]
    try:
        return max(found, key=lambda m: int(m.get("step", 0))) if found else None
    except (TypeError, ValueError):
        return found[0]


def latest_checkpoint_step(directory: str) -> int | None:
    """The step of a run's latest registered checkpoint, or ``None`` (none yet)."""
    metrics = latest_checkpoint_metrics(directory)
    try:
        return int(metrics["step"]) if metrics else None
    except (KeyError, TypeError, ValueError):
        return None
