"""Training data for experts and the router: one interface, two ways to feed it.

Long because the stream is one piece of state: its reader, its background producer and the
exact resume of its position (with the settings the position depends on) belong together.

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
"Streaming training data"): the streaming path is a thread in the training worker over the
corpus module's tolerant tar reader (:func:`hdd_ray.corpus.iter_samples`, local disks and object
stores through pyarrow). It adds no processes to an expert (each Ray Train run is already five
Ray processes; a Ray Data pipeline per expert adds an executor and read tasks competing for the
expert's CPUs), it reads damaged shards the way prepare does (Ray Data fails a whole block on one
bad sample), and its position is exact and cheap to restore, which neither Ray Data's iterators
nor WebDataset's shuffle buffer offer. Measured at the demo's scale: the same peak RSS at 16x
the data (ratio 1.00); steps/s 0.93 of the in-memory path on a shared 2-core machine (load
average 4.5-12), where decoding competes with training for the CPU. Ray Data and WebDataset
were not benchmarked against it.

**Streaming order.** Epoch ``e`` permutes the shards with ``(seed, e)`` (the same permutation on
every rank). Ranks read disjoint samples: with at least as many shards as ranks, rank ``r``
reads shards ``r, r + W, ...`` of the permutation; with fewer, every rank opens every shard and
keeps the records whose index in the shard is ``r`` modulo ``W``. A rank keeps
``data.open_shards`` shards open and reads *blocks*: about ``data.shuffle_buffer`` undecoded
samples taken round-robin from the open shards (a finished shard is replaced by the next one of
the permutation); the open shards stay open from one block to the next, so each record is read
once per pass (only a resume re-opens shards and skips to the recorded records). A block is shuffled with ``(seed, rank, epoch, block)`` and decoded batch by
batch in a background thread (``data.decode_workers`` threads decode; PIL releases the GIL),
``data.prefetch_batches`` batches ahead, pinned when training on CUDA. Memory: one block of
encoded samples plus the prefetched batches, whatever the cluster's size. The router streams
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

import logging
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.config import DATA_MODES, DataConfig
from hdd_ray.corpus import iter_samples
from hdd_ray.errors import ConfigError, first_line
from hdd_ray.models.text_features import TextFeatures
from hdd_ray.samples import (
    Condition,
    Decoding,
    Shard,
    batch_conditions,
    decode_sample,
    no_usable,
    read_samples,
    skip_reason,
    to_model_space,
)

log = logging.getLogger(__name__)

__all__ = [
    "DATA_MODES",
    "BatchSource",
    "MemorySource",
    "StreamSource",
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

    def close(self) -> None:
        """Stop background work."""


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


class _ShardStream:
    """One open shard: its records in order, and how many were read (damage included)."""

    def __init__(self, path: str, index: int, skip: int) -> None:
        self.index, self.read, self.path = index, 0, path
        self._it: Iterator[dict[str, Any]] | None = iter_samples(path, include_damaged=True)
        while self.read < skip and self.next() is not None:
            pass  # a resume: records already read, not decoded again

    def next(self) -> dict[str, Any] | None:
        if self._it is None:
            return None
        try:
            record = next(self._it, None)
        except Exception as exc:  # a shard that cannot be opened or listed: one damaged record
            self._it, record = None, {"__key__": "", "__url__": self.path,
                                      "__error__": "unreadable_shard",
                                      "__detail__": first_line(exc)}
        if record is not None:
            self.read += 1
        return record


class _Reader:
    """A rank's deterministic sequence of shuffled blocks (see the module docstring)."""

    def __init__(self, shards: list[Shard], settings: DataConfig, seed: int, rank: int,
                 world: int) -> None:
        self.shards, self.settings = shards, settings
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.split = len(shards) >= world  # shards split by rank, else records modulo world
        # the shards left open by the last block, with the position they stand at: the next
        # block continues them instead of re-opening and skipping (a resume, or a position
        # other than the last one returned, re-opens)
        self._live: tuple[int, int, list[_ShardStream]] | None = None

    def order(self, epoch: int) -> list[int]:
        """This rank's shards (indices into ``shards``) in epoch ``epoch``'s order."""
        perm = np.random.default_rng([self.seed, epoch, 71]).permutation(len(self.shards))
        return [int(i) for i in (perm[self.rank::self.world] if self.split else perm)]

    @staticmethod
    def start(epoch: int) -> dict[str, Any]:
        """The position at the start of an epoch."""
        return {"epoch": epoch, "block": 0, "next": 0, "slots": None}

    def _open(self, order: list[int], i: int, skip: int = 0) -> _ShardStream:
        return _ShardStream(self.shards[order[i]][0], i, skip)

    def _continue(self, pos: dict[str, Any]) -> list[_ShardStream | None] | None:
        """The open shards of the last block when ``pos`` is exactly where they stand (the
        position that block returned), else ``None``. Hands them over: used once."""
        live, self._live = self._live, None
        if live is None:
            return None
        epoch, nxt, streams = live
        want = [[int(i), int(n)] for i, n in pos["slots"]]
        if (epoch != pos["epoch"] or nxt != pos["next"]
                or want != [[st.index, st.read] for st in streams]):
            return None
        return list(streams)

    def who(self) -> str:
        """`` for rank r of W`` with several ranks, else nothing (for messages)."""
        return f" for rank {self.rank} of {self.world}" if self.world > 1 else ""

    def release(self) -> None:
        """Drop the shards kept open between blocks."""
        self._live = None

    def read_block(self, pos: dict[str, Any]) -> tuple[list[tuple[dict, int]], int, dict]:
        """The block at ``pos``: ``(samples with labels, damaged records, position after)``;
        no samples and no damage when the epoch is over."""
        order = self.order(pos["epoch"])
        if pos["slots"] is None:  # epoch start: the first shards of the permutation
            width = min(self.settings.open_shards, len(order))
            slots = [self._open(order, i) for i in range(width)]
            nxt = width
        else:
            slots = self._continue(pos) or [self._open(order, i, skip)
                                            for i, skip in pos["slots"]]
            nxt = pos["next"]
        per_slot = max(1, math.ceil(self.settings.shuffle_buffer / max(1, len(slots))))
        block, damaged = [], 0
        for s in range(len(slots)):
            taken = 0
            while taken < per_slot and slots[s] is not None:
                stream = slots[s]
                record = stream.next()
                if record is None:  # shard done: the next one of the permutation takes its slot
                    slots[s] = self._open(order, nxt) if nxt < len(order) else None
                    nxt += slots[s] is not None
                    continue
                if not self.split and (stream.read - 1) % self.world != self.rank:
                    continue  # another rank's record
                taken += 1
                if "__error__" in record:
                    damaged += 1
                    # damage is counted (and told) on the first pass only; a read that failed
                    # (an I/O error after every retry) is told in every pass
                    if pos["epoch"] == 0 or record.get("__detail__"):
                        why = str(record["__error__"]) + (
                            f" ({record['__detail__']})" if record.get("__detail__") else "")
                        log.warning("data%s: %s", self.who(), skip_reason(record, why))
                else:
                    block.append((record, self.shards[order[stream.index]][1]))
        live = [st for st in slots if st is not None]
        open_slots = [[st.index, st.read] for st in live]
        after = ({"epoch": pos["epoch"], "block": pos["block"] + 1, "next": nxt,
                  "slots": open_slots} if open_slots or nxt < len(order)
                 else self.start(pos["epoch"] + 1))
        self._live = (after["epoch"], nxt, live) if after["slots"] is not None else None
        perm = np.random.default_rng([self.seed, self.rank, pos["epoch"], pos["block"], 72])
        return [block[i] for i in perm.permutation(len(block))], damaged, after


@dataclass
class _Prepared:
    """A batch formed in the background, with what the consumer accounts when it takes it."""

    batch: Batch
    total: Tensor  # float64 sum of the raw values
    skipped: int
    position: dict[str, Any]


class StreamSource(BatchSource):
    """Batches streamed from the shards with bounded memory (see the module docstring)."""

    streaming = True

    def __init__(self, shards: list[Shard], how: Decoding, settings: DataConfig, seed: int,
                 rank: int = 0, world: int = 1, pin_memory: bool = False) -> None:
        if not shards:
            raise no_usable([], 0)
        self.how, self.settings, self.pin = how, settings, pin_memory
        self.reader = _Reader(shards, settings, seed, rank, world)
        self.paths = [p for p, _ in shards]
        self.position: dict[str, Any] = {"block": _Reader.start(0), "offset": 0}
        self.skipped, self.count = 0, 0
        self.total = torch.zeros(how.channels, how.image_size, how.image_size,
                                 dtype=torch.float64)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0

    # -- the consumer (training thread)

    def next_batch(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """The next ``n`` samples of the stream (``generator`` is not used: the order is the
        stream's own, seeded by ``(seed, rank, epoch)``)."""
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
        self.position = item.position
        self.skipped += item.skipped
        self.total += item.total
        self.count += n
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

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue at a recorded position (before the first batch)."""
        if self._thread is not None:
            raise RuntimeError("load_state after the stream started")
        self.position = state["position"]
        self.skipped, self.count = int(state["skipped"]), int(state["count"])
        self.total = state["total"].to(torch.float64).clone()

    def start_epoch(self, epoch: int, skipped: int = 0) -> None:
        """Start at the beginning of ``epoch`` with ``skipped`` samples already counted (a
        resume with another number of workers, or from the in-memory path)."""
        if self._thread is not None:
            raise RuntimeError("start_epoch after the stream started")
        self.position = {"block": _Reader.start(epoch), "offset": 0}
        self.skipped = int(skipped)

    def close(self) -> None:
        """Stop the background thread (it exits at its next queue operation)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()  # type: ignore[union-attr]
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        self.reader.release()

    # -- the producer (background thread)

    def _start(self, n: int) -> None:
        self._n = n
        self._queue = queue.Queue(maxsize=max(1, self.settings.prefetch_batches))
        self._thread = threading.Thread(target=self._produce, name="hdd-ray-data", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # type: ignore[union-attr]
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(max(1, self.settings.decode_workers)) as pool:
                self._batches(pool)
        except BaseException as exc:  # handed to the training thread, raised there
            self._put(exc)

    def _decoded(self, pool: ThreadPoolExecutor
                 ) -> Iterator[tuple[tuple[np.ndarray, Condition, int] | None, int, dict[str, Any]]]:
        """``(decoded sample or None if damaged, damage to count, position after it)`` in
        stream order, forever. Raises :class:`hdd_ray.errors.NoUsableData` when a pass over the data gives no
        usable sample and none ever came (a rank's shards differ per epoch: one empty pass of
        a rank that had data before is passed over)."""
        block_pos, offset = self.position["block"], int(self.position["offset"])
        ever, good, bad, empty_passes = self.count > 0, 0, 0, 0
        chunk = max(8, 2 * self._n)
        while True:
            items, damaged, after = self.reader.read_block(block_pos)
            first_pass = block_pos["epoch"] == 0
            # a block's read damage is counted when its first sample is consumed, once
            damage = damaged if (offset == 0 and first_pass) else 0
            bad += damaged
            for start in range(offset, len(items), chunk):
                results = pool.map(self._decode_one, items[start:start + chunk])
                for j, result in enumerate(results, start):
                    if isinstance(result, str):  # undecodable: the reason
                        if first_pass:
                            log.warning("data%s: %s", self._who(), result)
                        result = None
                        bad += 1
                        damage += first_pass
                    else:
                        good += 1
                    pos = ({"block": after, "offset": 0} if j + 1 == len(items)
                           else {"block": block_pos, "offset": j + 1})
                    yield result, damage, pos
                    damage = 0
            if damage:  # a block of damage only: its count rides with the next sample
                yield None, damage, {"block": after, "offset": 0}
            if after["epoch"] != block_pos["epoch"]:  # a pass over this rank's data ended
                ever = ever or good > 0
                empty_passes = 0 if good else empty_passes + 1
                if (not ever and empty_passes) or empty_passes > 100:
                    raise no_usable(self.paths, bad, self._who())
                good, bad = 0, 0
            block_pos, offset = after, 0

    def _who(self) -> str:
        return self.reader.who()

    def _decode_one(self, item: tuple[dict, int]) -> tuple[np.ndarray, Condition, int] | str:
        """The decoded sample, or why it cannot be decoded."""
        record, label = item
        try:
            arr, caption = decode_sample(record, self.how)
        except Exception as exc:
            return skip_reason(record, exc)
        return arr, caption, label

    def _batches(self, pool: ThreadPoolExecutor) -> None:
        arrays, captions, labels, skipped = [], [], [], 0
        for result, damage, pos in self._decoded(pool):
            if self._stop.is_set():
                return
            skipped += damage
            if result is None:
                continue
            arrays.append(result[0])
            captions.append(result[1])
            labels.append(result[2])
            if len(arrays) < self._n:
                continue
            raw = torch.from_numpy(np.stack(arrays))
            x = to_model_space(raw)
            conditions = batch_conditions(captions, self.how)
            if self.pin:
                x = x.pin_memory()
                if isinstance(conditions, TextFeatures):
                    conditions = conditions.pin_memory()
            total = raw.to(torch.float64).sum(0)
            item = _Prepared((x, conditions, torch.tensor(labels)), total, skipped, pos)
            if not self._put(item):
                return
            arrays, captions, labels, skipped = [], [], [], 0


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
