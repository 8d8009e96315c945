"""Checkpoints written while training goes on (``train.async_checkpoint``, on by default).

A DiT-XL/2 checkpoint is ~12 GB (weights, EMA, AdamW's two moments); serialising and writing it
in the training thread stalls the GPU for as long. Instead:

1. :class:`StateSnapshot` copies the loop's state off the live model, EMA and optimizer into
   host buffers, synchronously, at the checkpoint's step: later steps cannot change what is
   written. On CUDA the copies go into pinned buffers without blocking, then one
   ``torch.cuda.synchronize``. The buffers are kept and reused by the next checkpoint, so a run
   holds one extra host copy of its state, no more.
2. :class:`CheckpointWriter` serialises and writes that snapshot in a background thread (or
   tracks a write that runs in Ray Train's upload thread, :mod:`hdd_ray.training.hooks`), at
   most one write in flight: a new checkpoint first waits for the previous one, which is also
   when the buffers are free again.
3. :meth:`CheckpointWriter.wait` is where a write's failure surfaces, as one
   :class:`hdd_ray.errors.CheckpointWriteError` line (step, where, why); the loop waits at the
   drain and final checkpoints and on every way out of the loop, so no write is lost or
   dropped silently.

What a crash mid-write leaves is the checkpoint format's business
(:mod:`hdd_ray.training.checkpoints`: the task checkpoint's files are each replaced atomically,
the metrics last; Ray Train registers a checkpoint only once its write returned).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hdd_ray.errors import CheckpointWriteError, first_line

__all__ = ["CheckpointWriter", "StateSnapshot"]


class StateSnapshot:
    """Host copies of the loop's state (nested dicts, lists and tuples of tensors and plain
    values), written into buffers that are reused from one checkpoint to the next."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], Tensor] = {}

    def take(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` whose tensors are host tensors no later step touches.

        Reuses the buffers of the previous snapshot: call it only once the previous write is
        done with them (:meth:`CheckpointWriter.wait`)."""
        cuda: set[torch.device] = set()
        out = self._copy((), state, cuda)
        for device in cuda:  # the one wait for the copies queued without blocking
            torch.cuda.synchronize(device)
        return out

    def _copy(self, path: tuple[Any, ...], value: Any, cuda: set[torch.device]) -> Any:
        if isinstance(value, Tensor):
            return self._tensor(path, value, cuda)
        if isinstance(value, dict):
            items = [(k, self._copy((*path, k), v, cuda)) for k, v in value.items()]
            return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
        if isinstance(value, (list, tuple)):
            copied = [self._copy((*path, i), v, cuda) for i, v in enumerate(value)]
            return copied if isinstance(value, list) else tuple(copied)
        return copy.deepcopy(value)

    def _tensor(self, path: tuple[Any, ...], tensor: Tensor, cuda: set[torch.device]) -> Tensor:
        tensor = tensor.detach()
        on_cuda = tensor.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=on_cuda)
            self._buffers[path] = buffer
        buffer.copy_(tensor, non_blocking=on_cuda)
        if on_cuda:
            cuda.add(tensor.device)
        return buffer


class _Write:
    """One checkpoint write: done once it returned or failed (``error``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.done = threading.Event()
        self.error: CheckpointWriteError | None = None

    def run(self, write: Callable[[], Any]) -> Any:
        """``write()``; a failure is kept (for :meth:`CheckpointWriter.wait`) and raised as one
        :class:`CheckpointWriteError` line."""
        try:
            result = write()
        except CheckpointWriteError as exc:
            self.error = exc
            self.done.set()
            raise
        except Exception as exc:
            self.error = CheckpointWriteError(
                f"checkpoint {self.what} not written: {type(exc).__name__}: {first_line(exc)}")
            self.done.set()
            raise self.error from exc
        self.error = None  # (a retry of a failed write that succeeded: Ray Train's upload retries)
        self.done.set()
        return result

    def run_quietly(self, write: Callable[[], Any]) -> None:
        """:meth:`run` in a background thread: the failure waits for :meth:`CheckpointWriter.wait`."""
        try:
            self.run(write)
        except CheckpointWriteError:
            pass


class CheckpointWriter:
    """At most one checkpoint write in flight; its failure raised by :meth:`wait`."""

    def __init__(self) -> None:
        self._current: _Write | None = None

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its failure as one
        :class:`CheckpointWriteError` line (once)."""
        current, self._current = self._current, None
        if current is None:
            return
        current.done.wait()
        if current.error is not None:
            raise current.error

    def forget(self) -> None:
        """Drop the write in flight without waiting (its report failed: it will never run)."""
        self._current = None

    def write(self, write: Callable[[], Any], what: str, wait: bool) -> None:
        """Run ``write`` (``what``: the step and where, for the error line) once the previous
        write is done: in this thread when ``wait``, else in a background thread."""
        self.wait()
        job = _Write(what)
        if wait:
            job.run(write)
            return
        self._current = job
        # not a daemon: an interpreter that exits lets a started checkpoint finish first
        threading.Thread(target=job.run_quietly, args=(write,), name="checkpoint-writer",
                         daemon=False).start()

    def track(self, write: Callable[..., Any], what: str, wait: bool) -> Callable[..., Any]:
        """``write`` wrapped to be run by Ray Train (``checkpoint_upload_fn``) once the previous
        write is done: its failure raised as one :class:`CheckpointWriteError` line; unless
        ``wait`` (run in this thread, its failure raised there), tracked as the write in
        flight, so that :meth:`wait` waits for it (it runs in Ray Train's upload thread)."""
        self.wait()
        job = _Write(what)
        if not wait:
            self._current = job
        return lambda *args: job.run(lambda: write(*args))
