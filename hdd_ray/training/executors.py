"""The two ways a run is executed (``ray.executor``), each returning ``(final weights, last
metrics)`` (:class:`hdd_ray.training.checkpoints.FinalWeights`: the last checkpoint's EMA file): under Ray Train (:func:`fit_train`, the default) or as one Ray task (:func:`fit_task`).

* ``train``: a ``TorchTrainer`` per run with its own ``RunConfig`` (name = the run's id,
  storage = its parent folder), ``FailureConfig`` and ``ScalingConfig`` (CPUs, GPUs,
  accelerator type, custom resources, labels): a worker group (DDP over ``num_workers``), drain
  checkpoints and Ray Train's checkpoint registry.
* ``task``: the same loop, checkpoints' contents and export, without a worker group: one Ray
  task with one worker's resources (:func:`hdd_ray.placement.worker_task`). It is for runs of
  one worker (the demo on a laptop: Ray Train's start-up costs ~13 CPU-s per run on 2 cores, the
  task's ~0 once a worker process has imported torch); DDP needs Ray Train.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from hdd_ray.placement import worker_task
from hdd_ray.training.checkpoints import FinalWeights, result_export, task_checkpoint_export
from hdd_ray.training.loop import train_loop, train_task
from hdd_ray.training.settings import RunSettings

if TYPE_CHECKING:
    from ray.train import ScalingConfig

__all__ = ["fit", "fit_task", "fit_train", "one_line"]


def fit(executor: str, settings: RunSettings, resources: dict[str, Any], storage_path: str,
        name: str) -> tuple[FinalWeights, dict[str, Any]]:
    """Train (or resume) run ``name`` in ``<storage_path>/<name>`` with ``executor``
    (``"train"`` or ``"task"``) -> ``(final weights, last metrics)``; raises the run's error."""
    if executor == "task":
        return fit_task(settings, resources)
    return fit_train(settings, resources, storage_path, name)


def fit_task(settings: RunSettings,
             resources: dict[str, Any]) -> tuple[FinalWeights, dict[str, Any]]:
    """The run as one Ray task (``ray.executor: task``) -> ``(final weights, last metrics)``.

    The task asks for the run's one worker's resources; on CPUs Ray reuses its worker
    processes, so a run starts without the new processes (and imports) of a Ray Train worker
    group (a GPU task gets a fresh process: :func:`hdd_ray.placement.worker_task`). A failed
    attempt is retried ``max_failures`` times, each resuming from the run's last checkpoint.
    ``max_preemption_failures`` does not apply: a task has no drain notice (a node lost is a
    failed attempt, resumed from the last periodic checkpoint).
    """
    import ray

    try:
        remote = worker_task(train_task, resources, max_retries=int(resources["max_failures"]),
                             retry_exceptions=True)
        metrics = ray.get(remote.remote(settings))
    except ray.exceptions.RayTaskError as exc:  # the loop's own error, not Ray's wrapper
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    final = task_checkpoint_export(str(settings.run_directory))
    if final is None:
        raise RuntimeError("the run ended without a checkpoint")
    return final, metrics


def fit_train(settings: RunSettings, resources: dict[str, Any], storage_path: str,
              name: str) -> tuple[FinalWeights, dict[str, Any]]:
    """The run under Ray Train (``ray.executor: train``) -> ``(final weights, last metrics)``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        # the settings travel bound to the entry point (train_loop_config is a JSON-ish dict)
        functools.partial(train_loop, settings),
        scaling_config=_scaling(resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(
                max_failures=int(resources["max_failures"]),
                max_preemption_failures=int(resources["max_preemption_failures"]),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # one INFO line per report would drown the job's output
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result_export(result), dict(result.metrics)


def _scaling(resources: dict[str, Any]) -> ScalingConfig:
    """Ray Train's ``ScalingConfig`` of a run's resources."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": float(resources["cpus_per_worker"])}
    if resources["gpus_per_worker"] > 0:
        per_worker["GPU"] = float(resources["gpus_per_worker"])
    per_worker.update({k: float(v) for k, v in resources["custom"].items()})
    return ScalingConfig(
        num_workers=int(resources["num_workers"]),
        use_gpu=resources["gpus_per_worker"] > 0,
        resources_per_worker=per_worker,
        accelerator_type=resources.get("accelerator_type"),
        label_selector=resources.get("label_selector") or None,
    )


def one_line(exc: BaseException) -> str:
    """A run's failure as one line of its status (Ray's wrapping and the exception's class
    name stripped; 300 characters at most)."""
    text = str(exc).strip()
    for marker in ("NoUsableData: ", "WeightsMismatch: ", "CheckpointWriteError: ",
                   "ValueError: ", "RuntimeError: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
