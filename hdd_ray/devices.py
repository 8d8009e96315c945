"""Where tensors live, and the one way to draw random numbers for them.

Every random draw of training, sampling and evaluation goes through this module (a test scans
the package for direct ``torch.rand``/``randn``/``randint``/``randperm``/``Generator`` calls
elsewhere). The rule that makes a device mismatch impossible: **a draw is made on its
generator's device, then moved to the device asked for**. A generator therefore never meets a
tensor of another device inside a kernel (PyTorch refuses a CPU generator for a CUDA draw), and
CPU runs draw exactly what they drew before this module existed.

Which device a generator lives on is the caller's choice, by cost (measured on one CPU thread:
``randn`` of a DiT-XL/2 batch, 256 x 4 x 32 x 32, takes 6.9 ms; the 8x8 demo batch 0.016 ms):

* **training noise** (times, ``eps``, caption dropout): a generator on the training device
  (:class:`TrainingStreams`); drawing a latent batch on the CPU and copying it would put ~7 ms
  per step on the loop's critical path (the loss is read back every micro-step), ~3 % of a
  DiT-XL/2 step on an H100-class GPU;
* **sample indices** into a cluster held in host memory: a CPU generator (the indices index a
  CPU tensor; a few hundred integers);
* **sampling noise** of a mixture: drawn on the CPU and moved, once per batch (not per ODE step),
  so a mixture's starting noise for a seed is the same on every device;
* **evaluation** (held-out subsets, router-accuracy noise, the reference CLIP's batches): CPU
  generators, for the same reason.

What is reproducible: on the CPU a run is bit-exact, also across a resume (the generators'
states are checkpointed). On a GPU the draws themselves are reproducible (a CUDA generator's
state is its seed and offset, checkpointed and restored the same way) on the same GPU model and
torch build, but the weights are not bit-exact: cuDNN/cuBLAS choose kernels and atomics reorder
float sums. A resumed GPU run continues the same stream of draws and the same training, not the
same bits. CPU and GPU runs of one seed differ (ARCHITECTURE.md, "Devices and randomness").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hdd_ray.errors import ConfigError

log = logging.getLogger(__name__)

DeviceLike = torch.device | str

__all__ = [
    "TrainingStreams",
    "autocast",
    "generator",
    "pick_device",
    "rand",
    "randint",
    "randn",
    "randperm",
    "resolve_device",
    "stream_seed",
]


# ------------------------------------------------------------------------------------- devices


def pick_device(use_gpu: bool) -> torch.device:
    """``cuda`` when the stage was given GPUs (``use_gpu``) and this process sees one, else CPU.

    Inside a Ray task, actor or Train worker with GPUs, Ray sets ``CUDA_VISIBLE_DEVICES`` to the
    assigned ones, so ``cuda`` is the first of them. A stage asked to use a GPU that sees none
    runs on the CPU and says so in the log.
    """
    if not use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.warning("a GPU was asked for but this process sees none: running on the CPU")
    return torch.device("cpu")


def resolve_device(name: str, key: str = "--device") -> torch.device:
    """A device named by the user (``cpu``, ``cuda``, ``cuda:1``, ``auto``); one-line
    :class:`ConfigError` when it is not usable here."""
    if name == "auto":
        return pick_device(True) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={name!r}: expected cpu, cuda, cuda:<index> or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}: this machine has no CUDA device (use {key} cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}: expected cpu, cuda, cuda:<index> or auto")
    return device


def autocast(device: DeviceLike, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device when ``mixed_precision == "bf16"``; otherwise nothing.

    Wrap network calls only: the arithmetic around them (the objectives' losses, the conversion
    to a velocity, the ODE steps) stays in float32/float64 outside it.
    """
    if torch.device(device).type == "cuda" and mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------- randomness


def stream_seed(seed: int, rank: int = 0) -> int:
    """The seed of rank ``rank``'s generator: every rank of a run draws different samples."""
    return int(seed) * 100_003 + int(rank)


def generator(seed: int, device: DeviceLike = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _place(x: Tensor, device: DeviceLike | None) -> Tensor:
    return x if device is None else x.to(device)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _origin(gen: torch.Generator | None, device: DeviceLike | None) -> torch.device:
    # with a generator: its own device; without one: the global RNG of the target device
    if gen is not None:
        return gen.device
    return torch.device(device) if device is not None else torch.device("cpu")


def rand(shape: int | Sequence[int], gen: torch.Generator | None = None,
         device: DeviceLike | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Uniform [0, 1) of ``shape``, drawn on ``gen``'s device, returned on ``device``."""
    return _place(torch.rand(_shape(shape), generator=gen, device=_origin(gen, device),
                             dtype=dtype), device)


def randn(shape: int | Sequence[int], gen: torch.Generator | None = None,
          device: DeviceLike | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal of ``shape``, drawn on ``gen``'s device, returned on ``device``."""
    return _place(torch.randn(_shape(shape), generator=gen, device=_origin(gen, device),
                              dtype=dtype), device)


def randint(high: int, shape: int | Sequence[int], gen: torch.Generator | None = None,
            device: DeviceLike | None = None) -> Tensor:
    """Integers in ``[0, high)`` of ``shape``, drawn on ``gen``'s device, returned on ``device``."""
    return _place(torch.randint(0, int(high), _shape(shape), generator=gen,
                                device=_origin(gen, device)), device)


def randperm(n: int, gen: torch.Generator | None = None,
             device: DeviceLike | None = None) -> Tensor:
    """A permutation of ``0..n-1``, drawn on ``gen``'s device, returned on ``device``."""
    return _place(torch.randperm(int(n), generator=gen, device=_origin(gen, device)), device)


class TrainingStreams:
    """The training loop's generators, one pair per rank, seeded by ``(seed, rank)``.

    ``data`` draws sample indices into the cluster held in host memory (CPU); ``noise`` draws
    times, ``eps`` and caption dropout on the training ``device``. On the CPU both are **one**
    generator, so a CPU run draws exactly the stream it always drew (indices, then noise, from
    one generator). :meth:`state` / :meth:`load` checkpoint both.
    """

    def __init__(self, seed: int, rank: int, device: DeviceLike) -> None:
        self.seed, self.rank = int(seed), int(rank)
        self.device = torch.device(device)
        self.data = generator(stream_seed(seed, rank), "cpu")
        self.noise = self.data if self.device.type == "cpu" else self._noise_generator(0)

    def _noise_generator(self, step: int) -> torch.Generator:
        # a different stream from ``data`` (whose seed is the same number on another device)
        return generator(stream_seed(self.seed, self.rank) + 7_919 * (step + 1), self.device)

    @property
    def shared(self) -> bool:
        """Whether data and noise come from one generator (on the CPU)."""
        return self.noise is self.data

    def state(self) -> dict[str, Tensor]:
        """Generator states for a checkpoint (``rng``: data; ``rng_noise``: device noise)."""
        out = {"rng": self.data.get_state()}
        if not self.shared:
            out["rng_noise"] = self.noise.get_state()
        return out

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (a checkpoint of another device kind reseeds the noise stream
        from the data stream's position, which is all it can do)."""
        self.data.set_state(state["rng"])
        if not self.shared:
            if "rng_noise" in state:
                self.noise.set_state(state["rng_noise"])
            else:
                self.noise = self._noise_generator(int(state.get("step", 0)))

    def reseed(self, step: int) -> None:
        """Ranks whose states are not checkpointed (only rank 0 checkpoints) restart their
        streams from ``(seed, rank, step)``: different per rank and per resume point."""
        self.data.manual_seed(stream_seed(self.seed, self.rank) + int(step))
        if not self.shared:
            self.noise = self._noise_generator(int(step))


#: what an allocation that failed says, whichever library made it (the caching allocator,
#: cuBLAS / cuDNN workspaces, a CUDA launch, the host)
_OOM_WORDS = ("out of memory", "alloc_failed", "failed to allocate", "unable to allocate",
              "cannot allocate memory", "cudaerrormemoryallocation")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is any allocation failure, not only torch's ``OutOfMemoryError``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return any(word in text for word in _OOM_WORDS)
