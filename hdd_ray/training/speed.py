"""What makes a training step fast on a GPU without changing what it computes: TF32 matmuls and
``torch.compile`` (``train.compile``, on by default, applied on CUDA only) with a fallback to
the eager model when compilation fails, in one warning line instead of a failed run.

Compilation happens at the first call of the compiled model (dynamo traces it, inductor
generates the forward's kernels) and, lazily, at its first backward (the backward graph's
kernels). A failure at either (no compiler, an unsupported operation, an old GPU) raises before
that micro-batch has changed any weight or gradient, so the loop runs the same micro-batch
again eagerly (:meth:`CompiledOrEager.fall_back`) and the run goes on with the same batch,
noise and weights: a run that fell back trains exactly what an eager run trains. Running out
of memory is not a compiler failure: it is raised as it is, compilation stays on. An error the
eager model raises too (a real bug) is raised as before.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from hdd_ray.devices import is_out_of_memory

log = logging.getLogger(__name__)


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (Ampere and newer): the fp32
    parts of a bf16-autocast step (norms, the loss, the optimizer's math stay fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class CompiledOrEager:
    """``model`` compiled by ``torch.compile``, called like it; the eager ``model`` from the
    first call that fails to compile on. ``no_sync`` and ``train`` reach the eager module
    (DDP's, when ``model`` is wrapped: the compiled graph calls it)."""

    def __init__(self, model: nn.Module) -> None:
        self.eager = model
        self.compiled: Any = torch.compile(model)
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                if not self.fall_back(exc):
                    raise
        return self.eager(*args, **kwargs)

    def fall_back(self, exc: BaseException) -> bool:
        """Whether the call or backward that raised ``exc`` should run again eagerly: yes (and
        eager from now on, after one warning line) unless it ran out of memory or the model is
        eager already."""
        if self.failed is not None or is_out_of_memory(exc):
            return False
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self.failed = f"{type(exc).__name__}: {first}"[:300]
        log.warning("torch.compile failed (%s): training without it", self.failed)
        return True

    def train(self, mode: bool = True) -> CompiledOrEager:
        """Training mode on the model (shared by the compiled and the eager call)."""
        self.eager.train(mode)
        return self

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` of the wrapped model (a micro-batch that does not all-reduce)."""
        return self.eager.no_sync()  # type: ignore[operator]


def unwrap(model: Any) -> nn.Module:
    """The network itself under :class:`CompiledOrEager`, ``torch.compile`` and DDP."""
    model = model.eager if isinstance(model, CompiledOrEager) else model
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model
