"""The stream's producer: the shards read in blocks and decoded in a process of their own.

:class:`hdd_ray.training.data.StreamSource` (the consumer, in the training process) starts one
producer process per rank (:func:`start_producer`). The producer runs :class:`BlockReader`
(the deterministic sequence of shuffled blocks, described in :mod:`hdd_ray.training.data`),
reads the next block in a thread while the current one is decoded (two blocks at most),
decodes with ``data.decode_workers`` threads, forms each batch as numpy arrays with the position
after it, and sends it through a pipe to the consumer, which keeps ``data.prefetch_batches``.
Its log records travel the same pipe, in order, and are logged by the consumer.

**Why a process** (measured in ``benchmarks/README.md``, "Streaming training data"): tar
parsing, PNG decoding and batch forming are Python work. In a thread of the training process
they took the training loop's GIL: on 2 cores a stream ran at 0.63 of the in-memory speed. In
a process of their own they run beside the loop. The process is forked (the consumer sends
nothing but its settings and position, and the producer never touches torch's devices); where
fork is unavailable, or the shards lie in an object store (an SDK client the training process
started is not safe to fork), it is spawned. Ray Data's streaming executor was not used: its
iterators give no exact position to resume from, and an executor per expert adds Ray processes
that compete for the expert's CPUs.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import math
import multiprocessing
import os
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from hdd_ray import storage
from hdd_ray.config import DataConfig
from hdd_ray.corpus import iter_samples
from hdd_ray.errors import first_line
from hdd_ray.samples import Condition, Decoding, Shard, decode_sample, no_usable, skip_reason

log = logging.getLogger(__name__)

__all__ = ["BlockReader", "Produced", "Producer", "start_producer"]


class _ShardStream:
    """One open shard: its records in order, and how many were read (damage included)."""

    def __init__(self, path: str, index: int, skip: int, counter: list[int]) -> None:
        self.index, self.read, self.path = index, 0, path
        self._counter = counter  # the reader's count of records read, shared by its shards
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
            self._counter[0] += 1
        return record


class BlockReader:
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
        #: records read from the shards so far (damage included; a resume's skipped ones too)
        self.records_read = [0]

    def order(self, epoch: int) -> list[int]:
        """This rank's shards (indices into ``shards``) in epoch ``epoch``'s order."""
        perm = np.random.default_rng([self.seed, epoch, 71]).permutation(len(self.shards))
        return [int(i) for i in (perm[self.rank::self.world] if self.split else perm)]

    @staticmethod
    def start(epoch: int) -> dict[str, Any]:
        """The position at the start of an epoch."""
        return {"epoch": epoch, "block": 0, "next": 0, "slots": None}

    def _open(self, order: list[int], i: int, skip: int = 0) -> _ShardStream:
        return _ShardStream(self.shards[order[i]][0], i, skip, self.records_read)

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
class Produced:
    """One batch as the producer sends it: numpy arrays, the position after it and what the
    consumer accounts when it takes it."""

    arrays: np.ndarray  # [n, C, H, W] uint8 pixels, or float16 / float32 latents
    conditions: list[Condition]
    labels: np.ndarray  # [n] int64
    total: np.ndarray  # float64 sum of the raw values, [C, H, W]
    skipped: int
    position: dict[str, Any]
    records_read: int  # the reader's count when the batch was formed


@dataclass
class _Job:
    """What the producer is told: everything it needs, picklable."""

    shards: list[Shard]
    how: Decoding
    settings: DataConfig
    seed: int
    rank: int
    world: int
    position: dict[str, Any]
    count: int  # samples consumed before (a resume): a pass with none is then not "never"
    batch_size: int
    parent: int  # the consumer's process id


class Producer:
    """The consumer's handle on a producer process: :meth:`get` the next item, :meth:`stop`.

    Items travel one pipe in order (batches, the producer's log records, its final error). The
    pipe's buffer is the only slack: the producer waits in ``send`` until the consumer reads, and
    the consumer's own queue holds ``data.prefetch_batches``. The consumer keeps only the read
    end, so a producer that dies (killed, out of memory) is an end of file, never a wait."""

    def __init__(self, job: _Job) -> None:
        methods = multiprocessing.get_all_start_methods()
        # forked where it can be; spawned when shards lie in an object store (an SDK that the
        # training process has started, e.g. pyarrow's S3 client, is not safe to fork)
        remote = any(storage.is_uri(path) for path, _ in job.shards)
        ctx = multiprocessing.get_context("fork" if "fork" in methods and not remote
                                          else "spawn")
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self.process = ctx.Process(target=_produce, args=(job, child_end, self._stop),
                                   name="hdd-ray-data", daemon=True)
        # the objects that exist now are left out of the forked producer's garbage
        # collections: scanning them would copy their pages (the whole heap) into it
        gc.freeze()
        try:
            self.process.start()
        finally:
            gc.unfreeze()
            child_end.close()  # the producer's end only: its death is an end of file here

    def get(self, timeout: float) -> Any:
        """The next item (:class:`Produced`, a log record or an exception); raises
        ``queue.Empty`` after ``timeout`` seconds, and ``RuntimeError`` when the producer
        ended without sending one."""
        try:
            if not self._conn.poll(timeout):
                raise queue.Empty
            return self._conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=1.0)
            raise RuntimeError(f"the data process ended (exit code {self.process.exitcode}) "
                               "without a batch") from None

    def stop(self) -> None:
        """Stop the producer and wait for it (a process that does not stop is killed)."""
        self._stop.set()
        self._conn.close()  # a producer blocked in send gets a broken pipe
        self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=2.0)


def start_producer(shards: list[Shard], how: Decoding, settings: DataConfig, seed: int,
                   rank: int, world: int, position: dict[str, Any], count: int,
                   batch_size: int) -> Producer:
    """A producer process streaming batches of ``batch_size`` from ``position`` (see the
    module docstring); ``count``: samples consumed before it."""
    return Producer(_Job(shards, how, settings, int(seed), int(rank), int(world), position,
                         int(count), int(batch_size), os.getpid()))


# ------------------------------------------------------------------------------------- producer


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the thread that forked it ends (a training worker
    killed outright leaves no producer behind); elsewhere its next send finds the pipe
    broken."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _PipeHandler(logging.handlers.QueueHandler):
    """The producer's log records, prepared as a :class:`logging.handlers.QueueHandler` does
    (picklable), sent to the consumer (which logs them) in stream order."""

    def __init__(self, send: Callable[[Any], bool]) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.send = send

    def enqueue(self, record: logging.LogRecord) -> None:
        """Send the prepared ``record`` through the pipe (waiting, never dropping it)."""
        self.send(record)


def _produce(job: _Job, out: Any, stop: Any) -> None:
    """The producer process: batches, log records and a final exception into ``out``."""
    _die_with_parent()
    if os.getppid() != job.parent:  # it died before the death signal was asked for
        return
    lock = threading.Lock()  # the reading thread and the decoding threads log too

    def send(item: Any) -> bool:
        if stop.is_set():
            return False
        try:
            with lock:
                out.send(item)
            return True
        except (OSError, EOFError):  # the consumer closed its end, or ended
            return False

    root = logging.getLogger("hdd_ray")
    root.handlers[:] = [_PipeHandler(send)]  # the consumer logs them, with its own handlers
    root.propagate = False
    root.setLevel(logging.INFO)
    try:
        reader = BlockReader(job.shards, job.settings, job.seed, job.rank, job.world)
        with ThreadPoolExecutor(max(1, job.settings.decode_workers)) as pool:
            for item in _batches(job, reader, pool):
                if not send(item):
                    return
    except BaseException as exc:  # handed to the consumer, raised there
        send(_picklable(exc))
    finally:
        out.close()


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` when it survives pickling, else a ``RuntimeError`` with its first line."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {first_line(exc)}")


def _blocks(reader: BlockReader, pos: dict[str, Any]
            ) -> Iterator[tuple[dict[str, Any], tuple[list, int, dict[str, Any]]]]:
    """``(position, block at it)`` from ``pos`` on, forever: the next block is read in a
    thread while the current one is decoded."""
    ahead: queue.Queue = queue.Queue()
    done = threading.Event()
    slot = threading.Semaphore(1)  # one block read ahead of the one being decoded, no more

    def read() -> None:
        p = pos
        try:
            while not done.is_set():
                if not slot.acquire(timeout=0.1):
                    continue
                block = reader.read_block(p)
                ahead.put((p, block))
                p = block[2]
        except BaseException as exc:
            ahead.put((p, exc))

    thread = threading.Thread(target=read, name="hdd-ray-data-read", daemon=True)
    thread.start()
    try:
        while True:
            p, block = ahead.get()
            if isinstance(block, BaseException):
                raise block
            slot.release()  # the block before this one is done: read the next one
            yield p, block
    finally:
        done.set()


def _decode_one(item: tuple[dict, int], how: Decoding) -> tuple[np.ndarray, Condition, int] | str:
    """The decoded sample, or why it cannot be decoded."""
    record, label = item
    try:
        arr, caption = decode_sample(record, how)
    except Exception as exc:
        return skip_reason(record, exc)
    return arr, caption, label


def _decoded(job: _Job, reader: BlockReader, pool: ThreadPoolExecutor
             ) -> Iterator[tuple[tuple[np.ndarray, Condition, int] | None, int, dict[str, Any]]]:
    """``(decoded sample or None if damaged, damage to count, position after it)`` in
    stream order, forever. Raises :class:`hdd_ray.errors.NoUsableData` when a pass over the
    data gives no usable sample and none ever came (a rank's shards differ per epoch: one
    empty pass of a rank that had data before is passed over)."""
    offset = int(job.position["offset"])
    ever, good, bad, empty_passes = job.count > 0, 0, 0, 0
    chunk = max(8, 2 * job.batch_size)
    workers = max(1, job.settings.decode_workers)
    paths = [p for p, _ in job.shards]
    for block_pos, (items, damaged, after) in _blocks(reader, job.position["block"]):
        first_pass = block_pos["epoch"] == 0
        # a block's read damage is counted when its first sample is consumed, once
        damage = damaged if (offset == 0 and first_pass) else 0
        bad += damaged
        for start in range(offset, len(items), chunk):
            part = items[start:start + chunk]
            # one task per decode thread, not per sample: a future costs as much as decoding
            # a small image
            step = math.ceil(len(part) / workers)
            results = [r for rs in pool.map(lambda sub: [_decode_one(it, job.how) for it in sub],
                                            [part[i:i + step] for i in range(0, len(part), step)])
                       for r in rs]
            for j, result in enumerate(results, start):
                if isinstance(result, str):  # undecodable: the reason
                    if first_pass:
                        log.warning("data%s: %s", reader.who(), result)
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
                raise no_usable(paths, bad, reader.who())
            good, bad = 0, 0
        offset = 0


def _batches(job: _Job, reader: BlockReader, pool: ThreadPoolExecutor) -> Iterator[Produced]:
    """The stream's batches of ``job.batch_size``, each with the position after it."""
    arrays: list[np.ndarray] = []
    conditions: list[Condition] = []
    labels: list[int] = []
    skipped = 0
    for result, damage, pos in _decoded(job, reader, pool):
        skipped += damage
        if result is None:
            continue
        arrays.append(result[0])
        conditions.append(result[1])
        labels.append(result[2])
        if len(arrays) < job.batch_size:
            continue
        raw = np.stack(arrays)
        yield Produced(raw, conditions, np.asarray(labels, np.int64),
                       raw.sum(0, dtype=np.float64), skipped, pos, reader.records_read[0])
        arrays, conditions, labels, skipped = [], [], [], 0
