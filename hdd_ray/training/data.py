"""Training data for experts and the router: one interface, two ways to feed it.

The loop sees one :class:`BatchSource` (``next_batch(n, generator) -> (x0, captions, labels)``
with ``x0`` float32 ``[n, C, H, W]`` in model space, ``state()`` / ``load_state()``,
``skipped``, ``mean()``), built by :func:`open_source`:

* :class:`MemorySource`, the fast path for data that fits: every sample decoded once and kept
  as uint8 images (float16 latents), a batch drawn with replacement by the rank's CPU data
  generator (whose state the checkpoint holds, so a resumed run draws the same batches);
* :class:`StreamSource` over the prepared tar shards, with bounded memory.

``data.mode`` picks one (``memory``, ``stream``) or ``auto``: memory when the data's decoded size
(sample count from the manifest x ``C*H*W`` bytes, 2 per latent value) is at most
``data.in_memory_max_mb``, else stream. Both decode with :func:`decode_sample` and both return a
float32 batch converted only when the batch is formed (``x = pixel / 127.5 - 1``; latents are
already scaled).

**Why this reader, not Ray Data or WebDataset's pipeline** (numbers in ``benchmarks/README.md``,
"Streaming training data"): the stream is read and decoded by one producer process per rank
(:mod:`hdd_ray.training.stream`: off the training loop's GIL, the next block read while the
current one is decoded) over the corpus module's tolerant tar reader
(:func:`hdd_ray.corpus.iter_samples`, local disks and object stores through pyarrow); a thread
of the training process receives its batches and makes them tensors (pinned on CUDA). It adds
one process to an expert, not a Ray Data executor and read tasks competing for the expert's
CPUs; it reads damaged shards the way prepare does (Ray Data fails a whole block on one bad
sample), and its position is exact and cheap to restore, which neither Ray Data's iterators nor
WebDataset's shuffle buffer offer. Ray Data and WebDataset were not benchmarked against it.

**Streaming order.** Epoch ``e`` permutes the shards with ``(seed, e)`` (the same permutation on
every rank). Ranks read disjoint samples: with at least as many shards as ranks, rank ``r``
reads shards ``r, r + W, ...`` of the permutation; with fewer, every rank opens every shard and
keeps the records whose index in the shard is ``r`` modulo ``W``. A rank keeps
``data.open_shards`` shards open and reads *blocks*: about ``data.shuffle_buffer`` undecoded
samples taken round-robin from the open shards (a finished shard is replaced by the next one of
the permutation); the open shards stay open from one block to the next, so each record is read
once per pass (only a resume re-opens shards and skips to the recorded records). A block is
shuffled with ``(seed, rank, epoch, block)`` and decoded batch by batch in the producer process
(``data.decode_workers`` threads decode; PIL releases the GIL), ``data.prefetch_batches``
batches ahead, pinned when training on CUDA. Memory: two blocks of encoded samples (the one
decoding, the next one read ahead) plus the prefetched batches, whatever the cluster's size. The router streams
every cluster's shards as one pool, so it sees each cluster at its natural frequency: every
sample of every cluster once per epoch (the posterior it must learn, no prior correction).

**Resume guarantee.** The recorded position is the reader's state at the start of the current
block (epoch, block number, the permutation index of each open shard and the records read from
it) plus the number of the block's samples consumed. A resumed rank re-opens those shards,
skips the records already read (without decoding), re-reads and re-shuffles the same block and
continues at the next unconsumed sample: no sample is seen twice or left out, and the batches
are the ones the uninterrupted run would have drawn. Every rank's position is checkpointed (the
loop gathers them to rank 0) with the settings it depends on (``data.shuffle_buffer`` and
``data.open_shards``, which are not part of a run's identity); a resume with another number of
workers or other such settings starts the next epoch (continuing the position would repeat some
samples and skip others), and one that switched ``data.mode`` starts its source afresh, keeping
the skip count (``hdd_ray.training.loop._restore_data``).

**Skips.** A sample that fails to read or decode is skipped and counted, never raised: in the
stream, damage is counted on the first pass over the data only (each damaged sample once, as
prepare counts), and a pass without a single usable sample raises :class:`hdd_ray.errors.NoUsableData`.

**Data mean** (an expert's ``data_mean``, the conversion's prior near t = 1): in memory the
exact mean of the cluster; streaming, the running mean over the samples this rank has consumed
(float64 sums, checkpointed), which reaches the cluster's mean after one epoch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.config import DATA_MODES, DataConfig
from hdd_ray.errors import ConfigError
from hdd_ray.models.text_features import TextFeatures
from hdd_ray.samples import (
    Decoding,
    Shard,
    batch_conditions,
    no_usable,
    read_samples,
    to_model_space,
)
from hdd_ray.training.stream import BlockReader, Produced, Producer, start_producer

log = logging.getLogger(__name__)

__all__ = [
    "DATA_MODES",
    "BatchSource",
    "MemorySource",
    "StreamSource",
    "closed_on_error",
    "data_settings",
    "open_source",
]

#: ``(x0, conditions, labels)``: the captions, or their stored features (hdd_ray.models.text_features)
Batch = tuple[Tensor, list[str] | TextFeatures, Tensor]


def data_settings(data: dict[str, Any] | None) -> DataConfig:
    """A ``data`` section as a plain dict -> :class:`DataConfig` (missing keys keep their defaults)."""
    known = {k: v for k, v in (data or {}).items() if k in DataConfig.__dataclass_fields__}
    return DataConfig(**known)


def _mean_from_sum(total: Tensor, count: int, latents: bool) -> Tensor:
    """float64 sum of raw values over ``count`` samples -> float32 mean in model space."""
    mean = total / max(1, count)
    return (mean if latents else mean / 127.5 - 1.0).float()


# ------------------------------------------------------------------------------------- interface


class BatchSource:
    """What the training loop draws from (see the module docstring)."""

    skipped: int = 0
    streaming: bool = False

    def next_batch(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """``n`` samples: float32 ``[n, C, H, W]`` in model space, their captions (or stored
        text features), labels ``[n]``."""
        raise NotImplementedError

    def mean(self) -> Tensor:
        """The mean sample ``[C, H, W]`` in model space (see the module docstring)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """This rank's position, for the checkpoint."""
        return {"skipped": self.skipped}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (before the first batch)."""

    def prime(self, n: int) -> None:
        """Begin preparing batches of ``n`` before the first :meth:`next_batch` (a stream
        starts its producer; nothing in memory)."""

    def close(self) -> None:
        """Stop background work."""


@contextlib.contextmanager
def closed_on_error(source: BatchSource) -> Iterator[None]:
    """Stop ``source``'s background work (a primed stream's producer) when the block raises."""
    try:
        yield
    except BaseException:
        source.close()
        raise


# ------------------------------------------------------------------------------------- in memory


class MemorySource(BatchSource):
    """Every sample decoded once and held as uint8 (float16 latents); batches drawn with
    replacement by the rank's CPU data generator (today's fast path)."""

    def __init__(self, shards: list[Shard], how: Decoding, rank: int = 0) -> None:
        arrays, self.captions, labels, skipped = read_samples(shards, how)
        if not arrays:
            raise no_usable([p for p, _ in shards], skipped)
        self.how = how
        self.samples = torch.from_numpy(np.stack(arrays))
        self.labels = torch.tensor(labels)
        # every rank reads everything: rank 0 alone reports the damage, so the ranks' sum is it
        self.skipped = skipped if rank == 0 else 0
        self._mean: Tensor | None = None

    def __len__(self) -> int:
        return self.samples.shape[0]

    def next_batch(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """``n`` samples drawn with replacement with ``generator`` (CPU, the rank's data stream)."""
        idx = devices.randint(len(self), n, generator)  # on the CPU, where the samples are
        conditions = batch_conditions([self.captions[i] for i in idx.tolist()], self.how)
        return to_model_space(self.samples[idx]), conditions, self.labels[idx]

    def mean(self) -> Tensor:
        """The exact mean sample (sums of the raw values in float64, converted once)."""
        if self._mean is None:
            total = torch.zeros(self.samples.shape[1:], dtype=torch.float64)
            for start in range(0, len(self), 4096):  # no float copy of the whole cluster
                total += self.samples[start:start + 4096].to(torch.float64).sum(0)
            self._mean = _mean_from_sum(total, len(self), self.how.latents)
        return self._mean


# ------------------------------------------------------------------------------------- streaming


@dataclass
class _Prepared:
    """A batch received from the producer, with what the consumer accounts when it takes it."""

    batch: Batch
    total: Tensor  # float64 sum of the raw values
    skipped: int
    position: dict[str, Any]
    records_read: int


class StreamSource(BatchSource):
    """Batches streamed from the shards with bounded memory (see the module docstring)."""

    streaming = True

    def __init__(self, shards: list[Shard], how: Decoding, settings: DataConfig, seed: int,
                 rank: int = 0, world: int = 1, pin_memory: bool = False) -> None:
        if not shards:
            raise no_usable([], 0)
        self.how, self.settings, self.pin = how, settings, pin_memory
        self.shards, self.seed, self.rank, self.world = list(shards), int(seed), rank, world
        self.reader = BlockReader(shards, settings, seed, rank, world)  # its order, its rules
        self.position: dict[str, Any] = {"block": BlockReader.start(0), "offset": 0}
        self.skipped, self.count = 0, 0
        #: records the producer had read from the shards when it formed the last batch taken
        self.records_read = 0
        self.total = torch.zeros(how.channels, how.image_size, how.image_size,
                                 dtype=torch.float64)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        self._n = 0
        self._taken = False  # a batch was taken: the position moved on

    # -- the consumer (training thread)

    def next_batch(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """The next ``n`` samples of the stream (``generator`` is not used: the order is the
        stream's own, seeded by ``(seed, rank, epoch)``)."""
        if self._thread is not None and n != self._n and not self._taken:
            self._unstart("next_batch")  # primed for another batch size: start again
        if self._thread is None:
            self._start(n)
        elif n != self._n:
            raise ValueError(f"a stream forms batches of {self._n}, asked for {n}")
        assert self._queue is not None
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    raise RuntimeError("the data thread ended without a batch") from None
        if isinstance(item, BaseException):
            raise item
        self._taken = True
        self.position = item.position
        self.skipped += item.skipped
        self.total += item.total
        self.count += n
        self.records_read = item.records_read
        return item.batch

    def mean(self) -> Tensor:
        """Running mean over the samples consumed so far (zeros before the first batch)."""
        return _mean_from_sum(self.total, self.count, self.how.latents)

    def layout(self) -> dict[str, int]:
        """The settings a position depends on (the blocks' size and the shards read into each):
        a position is only continued under the same ones."""
        return {"shuffle_buffer": int(self.settings.shuffle_buffer),
                "open_shards": int(self.settings.open_shards)}

    def state(self) -> dict[str, Any]:
        """Position (with the :meth:`layout` it was taken under), skip count and the running
        sum (see the module docstring)."""
        return {"position": self.position, "layout": self.layout(), "skipped": self.skipped,
                "count": self.count, "total": self.total.clone()}

    def prime(self, n: int) -> None:
        """Start the producer now, at the current position: its first block (read whole
        before it is shuffled) is read while the run builds its model. A :meth:`load_state`
        or :meth:`start_epoch` before the first batch restarts it at the new position."""
        if self._thread is None:
            self._start(n)

    def _unstart(self, what: str) -> None:
        """Stop a primed producer that no batch was taken from (its position changes)."""
        if self._thread is None:
            return
        if self._taken:
            raise RuntimeError(f"{what} after the stream's first batch")
        self.close()
        self._thread = self._producer = None
        self._stop = threading.Event()

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue at a recorded position (before the first batch)."""
        self._unstart("load_state")
        self.position = state["position"]
        self.skipped, self.count = int(state["skipped"]), int(state["count"])
        self.total = state["total"].to(torch.float64).clone()

    def start_epoch(self, epoch: int, skipped: int = 0) -> None:
        """Start at the beginning of ``epoch`` with ``skipped`` samples already counted (a
        resume with another number of workers, or from the in-memory path)."""
        self._unstart("start_epoch")
        self.position = {"block": BlockReader.start(epoch), "offset": 0}
        self.skipped = int(skipped)

    def close(self) -> None:
        """Stop the receiving thread, then the producer process (each within seconds)."""
        self._stop.set()
        if self._thread is not None:  # it sees the stop within 0.1 s
            self._thread.join(timeout=5.0)
        if self._producer is not None:
            self._producer.stop()
        self.reader.release()

    # -- the receiver (a thread of the training process): batches from the producer process
    # turned into tensors (pinned when training on CUDA), ``data.prefetch_batches`` of them
    # kept; log records logged here

    def _start(self, n: int) -> None:
        self._n = n
        self._queue = queue.Queue(maxsize=max(1, self.settings.prefetch_batches))
        self._producer = start_producer(self.shards, self.how, self.settings, self.seed,
                                        self.rank, self.world, self.position, self.count, n)
        self._thread = threading.Thread(target=self._receive, name="hdd-ray-data", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # type: ignore[union-attr]
                return True
            except queue.Full:
                continue
        return False

    def _receive(self) -> None:
        assert self._producer is not None
        try:
            while not self._stop.is_set():
                try:
                    item = self._producer.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, logging.LogRecord):
                    logging.getLogger(item.name).handle(item)
                    continue
                if isinstance(item, BaseException):
                    raise item
                if not self._put(self._tensors(item)):
                    return
        except BaseException as exc:  # handed to the training thread, raised there
            self._put(exc)

    def _tensors(self, item: Produced) -> _Prepared:
        x = to_model_space(torch.from_numpy(item.arrays))
        conditions = batch_conditions(item.conditions, self.how)
        if self.pin:
            x = x.pin_memory()
            if isinstance(conditions, TextFeatures):
                conditions = conditions.pin_memory()
        batch = (x, conditions, torch.from_numpy(item.labels))
        return _Prepared(batch, torch.from_numpy(item.total), item.skipped, item.position,
                         item.records_read)


# ------------------------------------------------------------------------------------- choosing


def estimated_mb(shards: list[Shard], how: Decoding, num_samples: int | None) -> float:
    """Decoded size of the data in MiB: ``num_samples`` x bytes per sample, or (count unknown)
    the shards' size on storage."""
    if num_samples is not None:
        return num_samples * how.bytes_per_sample / 2 ** 20
    from hdd_ray.corpus import shard_listing

    return sum(size for _, size, _ in shard_listing([p for p, _ in shards])) / 2 ** 20


def open_source(shards: list[Shard], how: Decoding, settings: DataConfig, seed: int,
                rank: int = 0, world: int = 1, num_samples: int | None = None,
                pin_memory: bool = False) -> BatchSource:
    """The run's :class:`BatchSource`: memory or stream by ``settings.mode`` (``auto``: by
    :func:`estimated_mb` against ``settings.in_memory_max_mb``)."""
    if settings.mode not in DATA_MODES:
        raise ConfigError(f"data.mode={settings.mode!r}: expected one of {', '.join(DATA_MODES)}")
    mode = settings.mode
    if mode == "auto":
        size = estimated_mb(shards, how, num_samples)
        mode = "memory" if size <= settings.in_memory_max_mb else "stream"
        log.info("data: %.1f MiB decoded vs in_memory_max_mb=%g: %s", size,
                 settings.in_memory_max_mb, mode)
    if mode == "memory":
        return MemorySource(shards, how, rank)
    return StreamSource(shards, how, settings, seed, rank, world, pin_memory)
