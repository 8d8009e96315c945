"""What the training loop asks of whoever runs it, answered three ways.

The loop (:func:`hdd_ray.training.loop.run_loop`) asks its hooks for its rank and world size,
its device, the state to resume from, where a report (and a checkpoint) goes, whether the node
is being drained, and how to wrap the model for data parallelism:

* :class:`RayTrainHooks`: inside a Ray Train worker group (``ray.executor: train``);
* :class:`TaskHooks`: as one Ray task (``ray.executor: task``), checkpoints in
  ``<run>/checkpoint_task/``;
* :class:`LocalHooks`: a plain process, ``state.pt`` files in a folder (benchmarks, fast tests).

Either executor resumes from the newest checkpoint of the run, its own or the other's
(:mod:`hdd_ray.training.checkpoints`).

**Checkpoints are written in the background** (``train.async_checkpoint``,
:mod:`hdd_ray.training.writer`): the loop hands :meth:`report` a host snapshot of its state
and goes on training; ``report(..., wait=True)`` (the drain and final checkpoints, or every one
with the switch off) returns once the checkpoint is written, and :meth:`flush` waits for the
write in flight and raises its failure. :class:`LocalHooks` and :class:`TaskHooks` write in
a thread of their own (:class:`hdd_ray.training.writer.CheckpointWriter`).

:class:`RayTrainHooks` uses Ray Train's own background upload: ``ray.train.report(...,
checkpoint_upload_mode=ASYNC, checkpoint_upload_fn=...)`` for periodic checkpoints, ``SYNC``
for the drain and final ones, our ``checkpoint_upload_fn`` serialising the snapshot and
writing its files straight into the run's storage (:func:`checkpoints.write_checkpoint`; on
an object store through a local temporary folder).
Why, from Ray 2.60's source (``ray/train/v2/_internal/execution/context.py``, ``report``, and
``worker_group/worker.py``, ``run_train_fn``):

* ``report`` stays in the training thread on every rank, at the same steps, in the same order:
  it syncs the checkpoint's folder name across ranks (a barrier) there, then ``ASYNC`` submits
  the upload to a one-thread pool (``MAX_CHECKPOINT_UPLOAD_THREADS = 1``), which puts the
  report on the result queue (the controller registers it) only after the upload returned, in
  report order (``_wait_then_report``). A report is registered only once its files are
  written, so a crash mid-write leaves an unregistered folder, never a corrupt latest
  checkpoint. With a thread of our own, the report would have to come later, at a step every
  rank agrees on (one more collective), and the latest registered checkpoint would lag.
* ``ASYNC`` alone would not do: without an upload function the caller still writes the whole
  checkpoint to a local folder in the training thread; Ray only copies it in the background.
  Our upload function moves the serialisation itself off the training thread, and on a
  local or shared disk writes the files once (no local copy to upload).
* The next report: a ``SYNC`` one waits, in the training thread, for every earlier report to be
  on the queue; an ``ASYNC`` one is queued behind the upload in flight, without bound. So the
  loop waits for the previous write itself (:meth:`flush`, before its next snapshot): one
  write in flight, one host copy of the state.
* The worker's exit: after the training function returns, Ray shuts the upload pool down with
  ``wait=True`` (``train_fn_with_final_checkpoint_flush``), so a finished run's uploads
  complete; a training function that raises skips that, and the worker group is torn down
  with the upload possibly unfinished: the loop waits for its write on every way out
  (:meth:`flush` in its ``finally``), and uses ``SYNC`` for the drain and final checkpoints,
  which also wait for earlier reports to reach the controller.
* A failed ``ASYNC`` upload is put on the training thread's exception queue: the worker is
  reported failed (Ray Train retries the run from its last registered checkpoint), and the
  training thread's next :meth:`flush` raises it too (a later report would otherwise wait
  for it forever in ``_wait_then_report``).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import tempfile
from typing import Any

import torch
from torch import nn

from hdd_ray.training.checkpoints import (
    newest_state,
    other_state,
    ray_train_state,
    read_checkpoint,
    task_checkpoint_state,
    write_checkpoint,
    write_task_checkpoint,
)
from hdd_ray.training.writer import CheckpointWriter

__all__ = ["Hooks", "LocalHooks", "RayTrainHooks", "TaskHooks"]


class RayTrainHooks:
    """What the loop asks of its runner, answered by Ray Train (inside a worker group)."""

    def __init__(self, run_directory: str | None = None) -> None:
        import ray.train

        _quiet_report_log()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_directory = run_directory
        self.writer = CheckpointWriter()
        try:  # the run's storage (a DeveloperAPI of Ray Train)
            self.storage: Any = ctx.get_storage()
        except Exception:  # Ray Train's local mode (num_workers=0): nothing is persisted
            self.storage = None

    def device(self, use_cuda: bool) -> torch.device:
        """This worker's device (Ray Train's GPU for it, when asked)."""
        import ray.train.torch

        return ray.train.torch.get_device() if use_cuda else torch.device("cpu")

    def load_state(self) -> dict[str, Any] | None:
        """The newest state: Ray Train's checkpoint, or the task executor's when further along."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = read_checkpoint(d)
        # a run the task executor began (ray.executor switched to train): go on from there
        local = (other_state(lambda: task_checkpoint_state(self.run_directory),
                             f"{self.run_directory}: the task executor's checkpoint")
                 if self.run_directory else None)
        return newest_state(state, local)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None,
               wait: bool = False) -> None:
        """``ray.train.report``, with a checkpoint of ``state`` when it is given: written by Ray
        Train's upload thread (``ASYNC``), or before this returns when ``wait`` (``SYNC``)."""
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        if self.storage is None:  # local mode: Ray Train would not call an upload function
            with tempfile.TemporaryDirectory() as d:
                write_checkpoint(d, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            return
        storage = self.storage

        def upload(_: Any, name: str) -> Any:
            path = storage.build_checkpoint_path_from_name(name)
            write_checkpoint(path, state, storage.storage_filesystem)
            return ray.train.Checkpoint(path, filesystem=storage.storage_filesystem)

        upload_fn = self.writer.track(upload, f"of step {state['step']} (Ray Train)", wait)
        mode = ray.train.CheckpointUploadMode
        # Ray Train wants a local folder to report: an empty one, deleted once uploaded
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(
                                 tempfile.mkdtemp(prefix="hdd-ckpt-")),
                             checkpoint_upload_mode=mode.SYNC if wait else mode.ASYNC,
                             delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_fn=upload_fn)
        except BaseException:
            self.writer.forget()  # no upload will come: nothing to wait for
            raise

    def flush(self) -> None:
        """Wait for the checkpoint write in flight; raise its failure (one line)."""
        self.writer.wait()

    def preempted(self) -> bool:
        """Whether Ray reports a drain of this node."""
        import ray.train

        try:
            return ray.train.get_preemption_info() is not None
        except Exception:  # e.g. num_workers=0 (no worker group): nothing to ask
            return False

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the worker group (unchanged with one worker)."""
        import ray.train.torch

        if self.world == 1:
            return model
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": False})


class LocalHooks:
    """The same loop in a plain process: the checkpoint's files in ``directory``.

    Used for the orchestration-overhead benchmark (identical loop, no Ray) and fast tests.
    """

    rank, world = 0, 1

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.reports: list[dict[str, Any]] = []
        self.writer = CheckpointWriter()

    def device(self, use_cuda: bool) -> torch.device:
        """``cuda`` when asked, else the CPU."""
        return torch.device("cuda") if use_cuda else torch.device("cpu")

    def load_state(self) -> dict[str, Any] | None:
        """The checkpoint in ``directory``, or ``None``."""
        return read_checkpoint(self.directory)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None,
               wait: bool = False) -> None:
        """Keep ``metrics``; replace the checkpoint in ``directory`` with ``state`` when it is
        given: in the background, or before this returns when ``wait``."""
        self.reports.append(metrics)
        if state is not None:
            self.writer.write(lambda: write_checkpoint(self.directory, state),
                              f"of step {state['step']} to {self.directory}", wait)

    def flush(self) -> None:
        """Wait for the checkpoint write in flight; raise its failure (one line)."""
        self.writer.wait()

    def preempted(self) -> bool:
        """Never: a plain process gets no drain notice."""
        return False

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model itself (one process, no DDP)."""
        return model


class TaskHooks(LocalHooks):
    """The loop as one Ray task (``ray.executor: task``): one process, no worker group
    (:class:`LocalHooks`' device, no drain notice, no DDP wrapper).

    Checkpoints go to ``<run directory>/checkpoint_task/`` through :mod:`hdd_ray.storage` (a
    local path or a bucket, like Ray Train's storage). A retried task, or a later launch, resumes
    from the newest checkpoint of the run: its own or one Ray Train registered there. A task has
    no drain notice: Ray retries it and it resumes from its last checkpoint.
    """

    def load_state(self) -> dict[str, Any] | None:
        """The run's newest checkpoint state: its own, or one Ray Train registered here."""
        ray_train = other_state(lambda: ray_train_state(self.directory),
                                f"{self.directory}: Ray Train's latest checkpoint")
        return newest_state(task_checkpoint_state(self.directory), ray_train)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None,
               wait: bool = False) -> None:
        """Write ``state`` (when given) then ``metrics`` into ``checkpoint_task/``: in the
        background, or before this returns when ``wait``."""
        self.reports.append(metrics)
        if state is not None:
            self.writer.write(lambda: write_task_checkpoint(self.directory, state, metrics),
                              f"of step {state['step']} to {self.directory}", wait)


#: what the loop is run by
Hooks = RayTrainHooks | LocalHooks


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO under a path-named logger that LoggingConfig misses."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception:  # private module: best effort only
        pass


def node_info(device: torch.device) -> dict[str, Any]:
    """Where this attempt runs (host, platform, device, pid, GPU name, Ray node id): each
    attempt's entry of a run's history."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "device": str(device), "pid": os.getpid()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # get_runtime_context() would start Ray
        info["node_id"] = ray.get_runtime_context().get_node_id()
    return info


def process_group_info() -> dict[str, Any]:
    """Size of this run's collective group: an expert's group holds only its own workers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"pg_world_size": dist.get_world_size(), "pg_backend": str(dist.get_backend())}
    return {"pg_world_size": 1, "pg_backend": "none"}
