"""A run's checkpoints, as either executor writes them, and the readers of both.

Every checkpoint is a folder of two files (:func:`checkpoint_writers`): ``state.pt``, what a resume
needs besides the average (model, optimizer, step, generators, data positions), and
``ema.safetensors`` (:data:`EMA_FILE`), the EMA weights exactly as they are exported, with the
step, the attempts and the wall time in its metadata. The export reads that one file
(:func:`read_export`), never the optimizer state.

* Ray Train's (``ray.executor: train``): ``<run>/checkpoint_<time>/``, registered in
  ``<run>/checkpoint_manager_snapshot.json`` (:data:`RAY_TRAIN_SNAPSHOT`) with the metrics
  reported with it; its files written straight into Ray Train's storage
  (:func:`write_checkpoint`, as Ray Train's ``checkpoint_upload_fn``), the folder registered
  by Ray Train once they are; the record read here, never written.
* The task executor's (``ray.executor: task``): ``<run>/checkpoint_task/``, its two files and
  ``metrics.json``, each replaced atomically, the metrics last (:func:`write_task_checkpoint`).

A run resumes from the newest of the two (:func:`newest_state`), so switching ``ray.executor``
loses no step; the launcher's progress lines read the newest one's metrics
(:func:`latest_checkpoint_metrics`). Files go through :mod:`hdd_ray.storage` (a local path or a
bucket, like Ray Train's storage).
"""

from __future__ import annotations

import io
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file as save_safetensors_file
from torch import Tensor

from hdd_ray import storage

log = logging.getLogger(__name__)

__all__ = ["EMA_FILE", "RAY_TRAIN_SNAPSHOT", "STATE_FILE", "TASK_CHECKPOINT", "TASK_METRICS",
           "FinalWeights", "checkpoint_writers", "latest_checkpoint_metrics",
           "latest_checkpoint_step", "newest_state", "other_state", "ray_train_checkpoint_metrics",
           "ray_train_state", "read_checkpoint", "read_export", "result_export",
           "task_checkpoint_export", "task_checkpoint_metrics", "task_checkpoint_state",
           "write_checkpoint", "write_task_checkpoint"]

#: a checkpoint's state without the average (model, optimizer, step, generators, data positions)
STATE_FILE = "state.pt"
#: a checkpoint's EMA weights, as exported (safetensors; step, attempts, wall time as metadata)
EMA_FILE = "ema.safetensors"
#: the keys of the loop's state that go into the EMA file's metadata (JSON) as well
_PROGRESS = ("step", "history", "wall_time")
#: the task executor's checkpoint in a run directory (``ray.executor: task``): ``state.pt`` and
#: the metrics reported with it, each file replaced atomically
TASK_CHECKPOINT = "checkpoint_task"
TASK_METRICS = "metrics.json"
#: Ray Train's record of a run's registered checkpoints (read, never written, here)
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class FinalWeights:
    """What the export of a run needs, read from its last checkpoint's EMA file alone."""

    weights: dict[str, Tensor]  # the EMA weights, as exported
    step: int
    history: list[dict[str, Any]]  # one entry per attempt (its start step, node, time)
    wall_time: float


def checkpoint_writers(state: dict[str, Any]) -> dict[str, Callable[[str], None]]:
    """The loop's state (``ema`` = the exported EMA weights) as a checkpoint's files, each a
    function that writes it to a local path: :data:`EMA_FILE` first (the order to write them
    in), then :data:`STATE_FILE`. Written to files, not built as bytes: a 12 GB state is not
    copied once more, and a write in a background thread holds the GIL far less
    (:mod:`hdd_ray.training.writer`)."""
    progress = {k: state[k] for k in _PROGRESS}
    ema = {k: v.detach().cpu().contiguous() for k, v in state["ema"].items()}
    rest = {k: v for k, v in state.items() if k != "ema"}
    return {EMA_FILE: lambda path: save_safetensors_file(
                ema, path, metadata={"progress": json.dumps(progress)}),
            STATE_FILE: lambda path: torch.save(rest, path)}


def write_checkpoint(directory: str, state: dict[str, Any], filesystem: Any = None) -> None:
    """Write the loop's state as a checkpoint into ``directory`` (a local folder or a URI; or
    a folder of a pyarrow ``filesystem``, as Ray Train's storage gives it, which registers the
    folder only once this returned), each file replaced atomically on a local disk."""
    for name, write in checkpoint_writers(state).items():
        storage.write_with(storage.join(directory, name), write, filesystem)


def read_checkpoint(directory: str) -> dict[str, Any] | None:
    """The loop's state from a checkpoint folder (``ema`` read back from its own file), or
    ``None`` when the folder holds no checkpoint."""
    state_path = storage.join(directory, STATE_FILE)
    if not storage.exists(state_path):
        return None
    state = torch.load(io.BytesIO(storage.read_bytes(state_path)), map_location="cpu",
                       weights_only=True)
    ema_path = storage.join(directory, EMA_FILE)
    if "ema" in state and not storage.exists(ema_path):  # a checkpoint of the one-file layout
        return state
    ema = read_export(storage.read_bytes(ema_path))
    if ema.step != int(state["step"]):  # killed between its two files' replacements
        log.warning("%s: EMA file of step %d beside the state of step %d; the average goes on "
                    "from the EMA file's", directory, ema.step, int(state["step"]))
    state["ema"] = ema.weights
    return state


def read_export(data: bytes) -> FinalWeights:
    """An EMA file's weights and the progress in its metadata (``data``: the file's bytes)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8:8 + size]))
    progress = json.loads(header["__metadata__"]["progress"])
    return FinalWeights(load_safetensors(bytes(data)), int(progress["step"]),
                        list(progress["history"]), float(progress["wall_time"]))


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
    return read_checkpoint(storage.join(run_directory, TASK_CHECKPOINT))


def task_checkpoint_export(run_directory: str) -> FinalWeights | None:
    """The EMA weights and progress of a run's task-executor checkpoint (its EMA file only),
    or ``None``."""
    path = storage.join(run_directory, TASK_CHECKPOINT, EMA_FILE)
    return read_export(storage.read_bytes(path)) if storage.exists(path) else None


def write_task_checkpoint(run_directory: str, state: dict[str, Any],
                          metrics: dict[str, Any]) -> None:
    """Write ``state``, then ``metrics``, into ``<run_directory>/checkpoint_task/``."""
    # the state first: metrics never announce a step whose state is not written yet
    write_checkpoint(storage.join(run_directory, TASK_CHECKPOINT), state)
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
    return read_checkpoint(storage.join(run_directory, str(latest["checkpoint_dir_name"])))


def result_export(result: Any) -> FinalWeights:
    """The EMA weights and progress of a finished Ray Train ``Result``'s checkpoint, read from
    its EMA file alone (through the checkpoint's filesystem: nothing else is downloaded)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("the run ended without a checkpoint")
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{EMA_FILE}") as f:
        return read_export(f.read())


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
