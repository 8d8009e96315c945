"""Training data (hdd_ray.training.data): the stream's order, resume, rank split, damage,
latents and the in-memory fast path, on real tar shards (no Ray)."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from hdd_ray.config import DataConfig, load_config, resolve_experts
from hdd_ray.corpus import encode_png, tar_bytes, write_tar
from hdd_ray.errors import NoUsableData
from hdd_ray.samples import Decoding
from hdd_ray.training.data import (
    MemorySource,
    StreamSource,
    open_source,
)
from hdd_ray.training.loop import LocalHooks, run_loop
from hdd_ray.training.settings import RunSettings

HOW = Decoding(8, 1)


def _pixels(i: int) -> np.ndarray:
    return np.full((8, 8, 1), i % 251, np.uint8)


def _shards(tmp_path, sizes: list[int], prefix: str = "s") -> list[str]:
    """Shards of ``sizes`` samples; a sample's caption is its key, its pixels its number."""
    paths, n = [], 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            key = f"{prefix}{n:05d}"
            samples.append({"__key__": key, "png": encode_png(_pixels(n)), "txt": key,
                            "json": json.dumps({"cluster": 0})})
            n += 1
        path = tmp_path / f"{prefix}-{s:03d}.tar"
        write_tar(str(path), samples)
        paths.append(str(path))
    return paths


def _stream(paths, label=0, rank=0, world=1, **settings) -> StreamSource:
    base = {"shuffle_buffer": 16, "open_shards": 2, "prefetch_batches": 2}
    return StreamSource([(p, label) for p in paths], HOW, DataConfig(**{**base, **settings}),
                        seed=3, rank=rank, world=world)


def _keys(source, batches: int, n: int = 5) -> list[str]:
    out = []
    for _ in range(batches):
        out.extend(source.next_batch(n)[1])
    return out


def test_stream_sees_every_sample_once_per_epoch_in_a_new_order(tmp_path):
    paths = _shards(tmp_path, [7, 13, 10])  # 30 samples
    source = _stream(paths)
    keys = _keys(source, 12)  # two epochs
    source.close()
    first, second = keys[:30], keys[30:]
    assert sorted(first) == sorted(second) == [f"s{i:05d}" for i in range(30)]
    assert first != second and first != sorted(first)  # shuffled, differently per epoch
    assert source.position["block"]["epoch"] == 2


@pytest.mark.parametrize("consumed", [1, 3, 6, 7, 11])
def test_a_resumed_stream_continues_exactly_where_its_state_was_taken(tmp_path, consumed):
    paths = _shards(tmp_path, [7, 13, 10, 4])
    straight = _stream(paths)
    expected = _keys(straight, 16)
    straight.close()
    before = _stream(paths)
    head = _keys(before, consumed)
    state = before.state()
    before.close()
    after = _stream(paths)
    if consumed % 2:  # primed at the start, as a fresh run's task does: restarted at the state
        after.prime(5)
    after.load_state(state)
    tail = _keys(after, 16 - consumed)
    after.close()
    assert head + tail == expected  # nothing re-seen, nothing left out
    assert after.count == 16 * 5
    with pytest.raises(RuntimeError, match="after the stream's first batch"):
        after.load_state(state)


def test_a_stream_reads_each_record_once_per_pass_and_a_resume_skips_only_once(tmp_path):
    """The producer process counts the records it reads from the shards (``records_read``,
    as of the batch taken): once per pass, and a resume re-reads only up to its position."""
    paths = _shards(tmp_path, [300, 300])
    source = _stream(paths, shuffle_buffer=32, open_shards=2)
    _keys(source, 70)  # 350 samples, mid-pass
    state = source.state()
    _keys(source, 110)  # on into the next pass: 900 samples in all
    reads = source.records_read
    source.close()
    # before the fix every block re-opened both shards and skipped to its position (~10x);
    # the producer reads at most the next block ahead of the batch it formed
    assert 900 <= reads <= 1.1 * 900 + 2 * 32
    after = _stream(paths, shuffle_buffer=32, open_shards=2)
    after.load_state(state)
    _keys(after, 110)
    reads = after.records_read
    after.close()
    skipped_to = sum(n for _, n in state["position"]["block"]["slots"])
    assert 300 <= skipped_to <= 350  # what the resume must skip: the open shards' read records
    # a resume reads the records before its position once (not decoded), then streams on
    assert skipped_to + 550 <= reads <= skipped_to + 1.1 * 550 + 2 * 32


def test_the_stream_decodes_in_a_process_that_dies_with_its_training_process(tmp_path):
    """Reading and decoding run in a producer process (off the training loop's GIL); a
    training process killed outright leaves no producer behind."""
    import os
    import signal

    paths = _shards(tmp_path, [40, 40])
    source = _stream(paths)
    source.next_batch(4)
    producer = source._producer.process
    assert producer.is_alive() and producer.pid != os.getpid()
    source.close()
    assert not producer.is_alive()  # closed: stopped
    # a producer that dies (killed, out of memory) is an error in the training process, not a
    # wait: its pipe's only write end was its own
    source = _stream(paths)
    source.next_batch(4)
    os.kill(source._producer.process.pid, signal.SIGKILL)
    started = time.time()
    with pytest.raises(RuntimeError, match="the data process ended"):
        for _ in range(100):
            source.next_batch(4)
    assert time.time() - started < 10
    source.close()
    # a training process (forked from this one: nothing to import) killed outright
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def train_then_die() -> None:
        stream = _stream(paths)
        stream.next_batch(4)
        writer.send(stream._producer.process.pid)
        os.kill(os.getpid(), signal.SIGKILL)

    trainer = ctx.Process(target=train_then_die)
    trainer.start()
    writer.close()
    pid = reader.recv()
    trainer.join(timeout=30)
    assert trainer.exitcode == -signal.SIGKILL
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:  # a zombie (not yet reaped) has ended too
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the producer outlived its training process")


@pytest.mark.parametrize("sizes", [[9, 8, 7, 6], [20]])  # shards split by rank / records modulo
def test_ranks_read_disjoint_samples_that_cover_the_data(tmp_path, sizes):
    paths = _shards(tmp_path, sizes)
    total = sum(sizes)
    seen = []
    for rank in range(2):
        reader = _stream(paths, rank=rank, world=2).reader
        epoch: list[str] = []
        position = reader.start(0)
        while position["epoch"] == 0:  # the blocks of one pass
            items, _, position = reader.read_block(position)
            epoch.extend(record["txt"].decode() for record, _ in items)
        seen.append(epoch)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:05d}" for i in range(total)]


def test_damaged_samples_are_skipped_and_counted_once_never_raised(tmp_path):
    paths = _shards(tmp_path, [6, 6])
    bad = tmp_path / "bad-000.tar"  # one undecodable image and a shard cut short
    data = tar_bytes([{"__key__": "broken", "png": b"not a png", "txt": "broken"},
                      {"__key__": "ok", "png": encode_png(_pixels(1)), "txt": "ok"},
                      {"__key__": "cut", "png": encode_png(_pixels(2)) * 40, "txt": "cut"}])
    bad.write_bytes(data[: len(data) - 2048])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 10)
    source = _stream([*paths, str(bad), str(tmp_path / "junk.tar")])
    keys = _keys(source, 13, n=1)  # one pass (13 usable samples) ...
    assert sorted(keys) == sorted([f"s{i:05d}" for i in range(12)] + ["ok"])
    assert source.skipped == 3  # broken, cut, the junk shard
    _keys(source, 26, n=1)  # ... and two more: damage is counted on the first pass only
    source.close()
    assert source.skipped == 3
    memory = MemorySource([(p, 0) for p in [*paths, str(bad), str(tmp_path / "junk.tar")]], HOW)
    assert memory.skipped == 3 and len(memory) == 13
    dead = _stream([str(tmp_path / "junk.tar")])
    with pytest.raises(NoUsableData, match="no usable samples"):
        dead.next_batch(2)
    dead.close()


def test_latent_shards_decode_to_their_float16_values(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((12, 4, 2, 2)).astype(np.float16)
    samples = []
    for i, z in enumerate(latents):
        buf = io.BytesIO()
        np.save(buf, z)
        samples.append({"__key__": f"z{i:03d}", "latent.npy": buf.getvalue(), "txt": f"{i}",
                        "json": json.dumps({"cluster": 2})})
    path = tmp_path / "latent-000.tar"
    write_tar(str(path), samples)
    how = Decoding(2, 4, latents=True)
    source = StreamSource([(str(path), 2)], how, DataConfig(shuffle_buffer=5), seed=0)
    x, captions, labels = source.next_batch(12)
    source.close()
    assert x.dtype == torch.float32 and x.shape == (12, 4, 2, 2)
    want = torch.from_numpy(latents[[int(c) for c in captions]]).float()
    assert torch.equal(x, want) and labels.tolist() == [2] * 12
    # the stream's running mean: over the samples it has consumed
    consumed = torch.from_numpy(latents[[int(c) for c in captions]].astype(np.float64)).mean(0)
    assert torch.allclose(source.mean(), consumed.float(), atol=1e-6)
    exact = torch.from_numpy(latents.astype(np.float64).mean(0)).float()
    memory = MemorySource([(str(path), 2)], how)
    assert memory.samples.dtype == torch.float16 and torch.allclose(memory.mean(), exact,
                                                                       atol=1e-6)


def test_auto_mode_keeps_small_data_in_memory_as_uint8_and_streams_the_rest(tmp_path):
    paths = _shards(tmp_path, [10, 10])
    shards = [(p, 0) for p in paths]
    small = open_source(shards, HOW, DataConfig(in_memory_max_mb=1), 0, num_samples=20)
    assert isinstance(small, MemorySource) and small.samples.dtype == torch.uint8
    big = open_source(shards, HOW, DataConfig(in_memory_max_mb=1), 0, num_samples=10 ** 6)
    assert isinstance(big, StreamSource)
    big.close()
    forced = open_source(shards, HOW, DataConfig(mode="stream"), 0, num_samples=20)
    assert isinstance(forced, StreamSource)
    # a block holds about shuffle_buffer samples (the memory bound), whatever the data's size
    wide = _stream(_shards(tmp_path, [40, 40, 40], prefix="w"), shuffle_buffer=16)
    items, _, _ = wide.reader.read_block(wide.reader.start(0))
    assert len(items) == 16


def _expert_config(paths, steps: int, mode: str) -> RunSettings:
    cfg = load_config(overrides=["experts.objective=fm_velocity", "experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    train = dict(expert.train, steps=steps, checkpoint_every=10, batch_size=8)
    return RunSettings.from_dict({
        "kind": "expert", "expert": asdict(expert), "train": train, "image_size": 8,
        "channels": 1, "shards": paths, "torch_threads": 1,
        "data": {"mode": mode, "shuffle_buffer": 16, "open_shards": 2}})


def test_streamed_training_resumes_bit_exactly_and_records_its_data_position(tmp_path):
    paths = _shards(tmp_path, [9, 14, 11])
    straight = LocalHooks(str(tmp_path / "straight"))
    run_loop(_expert_config(paths, 30, "stream"), straight)
    split = LocalHooks(str(tmp_path / "split"))
    run_loop(_expert_config(paths, 20, "stream"), split)  # "preempted" after its checkpoint
    middle = split.load_state()["data"][0]["source"]
    assert middle["count"] == 20 * 8 and middle["position"]["block"]["epoch"] == 4  # 34 a pass
    run_loop(_expert_config(paths, 30, "stream"), split)
    a, b = straight.load_state(), split.load_state()
    assert a["data"][0]["source"]["position"] == b["data"][0]["source"]["position"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bit-identical
    # the running data mean: every sample consumed so far, in model space
    source = b["data"][0]["source"]
    mean = (source["total"] / source["count"] / 127.5 - 1).float()
    assert torch.equal(b["ema"]["data_mean"], mean)
    assert straight.reports[-1]["skipped"] == 0


@pytest.mark.parametrize("changed", [{"shuffle_buffer": 24}, {"open_shards": 3}])
def test_a_stream_resumed_under_other_data_settings_neither_repeats_nor_skips(tmp_path, caplog,
                                                                               changed):
    """The position depends on ``shuffle_buffer`` and ``open_shards`` (not part of the run's
    identity): under other values the resumed stream starts its next epoch, so the rest of the
    run sees whole epochs, each sample once per epoch."""
    import logging

    paths = _shards(tmp_path, [9, 14, 11])  # 34 samples
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(_expert_config(paths, 10, "stream"), hooks)  # 80 samples: into epoch 2
    saved = hooks.load_state()["data"][0]["source"]
    assert saved["layout"] == {"shuffle_buffer": 16, "open_shards": 2}
    epoch = saved["position"]["block"]["epoch"]
    resumed = _expert_config(paths, 20, "stream")
    resumed = replace(resumed, data=replace(resumed.data, **changed))
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        run_loop(resumed, hooks)
    assert "data settings changed since the checkpoint" in caplog.text
    position = hooks.load_state()["data"][0]["source"]["position"]
    assert position["block"]["epoch"] == epoch + 1 + (80 // 34)  # 80 more: two whole epochs
    # what the resumed stream reads: whole epochs from the next one on, each sample once
    stream = StreamSource([(p, 0) for p in paths], HOW, resumed.data, seed=resumed.train.seed)
    stream.start_epoch(epoch + 1)
    keys = _keys(stream, 34 // 2, n=2)
    stream.close()
    assert sorted(keys) == [f"s{i:05d}" for i in range(34)]


def test_the_router_streams_every_cluster_at_its_natural_frequency(tmp_path):
    from hdd_ray.training.loop import RouterTask

    sizes = {0: [12, 8], 1: [5], 2: [9, 6]}
    shards = {str(c): _shards(tmp_path, s, prefix=f"c{c}-") for c, s in sizes.items()}
    config = {"train": {"seed": 0}, "num_clusters": 3, "model": "router-T", "image_size": 8,
              "channels": 1, "cluster_shards": shards,
              "data": {"mode": "stream", "shuffle_buffer": 8, "open_shards": 3}}
    task = RouterTask(RunSettings.from_dict(config))
    labels: list[int] = []
    for _ in range(8):  # one pass over the 40 samples
        labels.extend(task.data.next_batch(5)[2].tolist())
    task.close()
    assert Counter(labels) == {c: sum(s) for c, s in sizes.items()}
    assert len(set(labels[:10])) > 1  # batches mix clusters


@pytest.mark.parametrize("override,message", [
    ("experts.data.mode=disk", "experts.data.mode='disk'"),
    ("router.data.shuffle_buffer=0", "router.data.shuffle_buffer=0: must be an integer >= 1"),
    ("experts.data.in_memory_max_mb=-1", "experts.data.in_memory_max_mb"),
])
def test_bad_data_settings_fail_in_one_line_naming_the_key(override, message):
    from hdd_ray.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert DataConfig().mode == "auto"


def test_bfloat16_latents_stored_as_float32_keep_values_beyond_float16_range(tmp_path):
    from hdd_ray.latents import encode_member

    big = np.full((4, 2, 2), 1.0e5, np.float32)  # beyond float16's 65504: bf16 storage's reason
    samples = [{"__key__": f"z{i:03d}", "latent.npy": encode_member(big * (i + 1), "bfloat16"),
                "txt": f"{i}", "json": json.dumps({"cluster": 0})} for i in range(3)]
    path = tmp_path / "latent-000.tar"
    write_tar(str(path), samples)
    how = Decoding(2, 4, latents=True, latent_bytes=4)
    assert how.bytes_per_sample == 4 * 4 * 2 * 2
    memory = MemorySource([(str(path), 0)], how)
    assert memory.samples.dtype == torch.float32
    assert torch.isfinite(memory.samples).all() and float(memory.samples.max()) > 2.9e5
    source = StreamSource([(str(path), 0)], how, DataConfig(shuffle_buffer=3), seed=0)
    x, _, _ = source.next_batch(3)
    source.close()
    assert torch.isfinite(x).all() and float(x.max()) > 2.9e5


def _with_a_damaged_shard(tmp_path) -> list[str]:
    bad = tmp_path / "bad-000.tar"
    write_tar(str(bad), [{"__key__": "broken", "png": b"not a png", "txt": "broken"},
                         {"__key__": "ok", "png": encode_png(_pixels(7)), "txt": "ok"}])
    return [*_shards(tmp_path, [9, 14, 11]), str(bad)]


@pytest.mark.parametrize("world_before", [1, 2])
def test_a_run_checkpointed_in_memory_resumes_streaming(tmp_path, world_before):
    paths = _with_a_damaged_shard(tmp_path)
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(_expert_config(paths, 20, "memory"), hooks)
    saved = hooks.load_state()
    assert "position" not in saved["data"][0]["source"] and hooks.reports[-1]["skipped"] == 1
    if world_before == 2:  # as if written by two workers (rank 1 of the memory path counts 0)
        saved["data"] = [saved["data"][0], {**saved["data"][0], "source": {"skipped": 0}}]
        torch.save(saved, tmp_path / "run" / "state.pt")
    run_loop(_expert_config(paths, 30, "stream"), hooks)  # data.mode changed: no KeyError
    source = hooks.load_state()["data"][0]["source"]
    assert source["count"] == 10 * 8  # a fresh stream: only the resumed steps' samples
    assert source["position"]["block"]["epoch"] >= 1  # started after epoch 0 ...
    assert hooks.reports[-1]["skipped"] == source["skipped"] == 1  # ... so damage counts once
    assert hooks.reports[-1]["step"] == 30


def test_a_run_checkpointed_streaming_resumes_in_memory(tmp_path):
    paths = _with_a_damaged_shard(tmp_path)
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(_expert_config(paths, 20, "stream"), hooks)
    assert "position" in hooks.load_state()["data"][0]["source"]
    run_loop(_expert_config(paths, 30, "memory"), hooks)  # data.mode changed
    final = hooks.load_state()
    assert final["data"][0]["source"] == {"skipped": 1} and hooks.reports[-1]["step"] == 30
    exact = MemorySource([(p, 0) for p in paths], HOW).mean()
    assert torch.equal(final["model"]["data_mean"], exact)  # not the stream's running mean


# ------------------------------------------------------------------ object-store reads (wrapped)


class _WrappedLocalFs:
    """A pyarrow filesystem handler over the local disk whose opened files count their reads,
    and whose first ``fail_reads`` reads (over all files) fail with a transient I/O error, as a
    dropped connection to an object store would."""

    def __init__(self, fail_reads: int = 0, always_fail: bool = False,
                 fail_on: tuple[int, ...] = ()) -> None:
        import pyarrow.fs as pafs

        self.local = pafs.LocalFileSystem()
        self.reads, self.opens, self.fail_reads, self.always_fail = 0, 0, fail_reads, always_fail
        self.fail_on = set(fail_on)  # these reads (1-based, over every file) fail once

    def _file(self, path: str):
        import pyarrow as pa

        outer, raw = self, open(path, "rb")  # noqa: SIM115 - closed by pyarrow's PythonFile

        class Counting(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def seek(self, offset: int, whence: int = 0) -> int:
                return raw.seek(offset, whence)

            def tell(self) -> int:
                return raw.tell()

            def read(self, n: int = -1) -> bytes:
                outer.reads += 1
                if outer.reads in outer.fail_on:
                    raise TimeoutError("read timed out")
                if outer.always_fail or outer.fail_reads > 0:
                    outer.fail_reads -= 1
                    raise ConnectionResetError("connection reset by peer")
                return raw.read(n)

            def close(self) -> None:
                raw.close()
                super().close()

        self.opens += 1
        return pa.PythonFile(Counting(), mode="r")

    # the handler interface (pyarrow.fs.FileSystemHandler), reads wrapped, the rest delegated
    def get_type_name(self) -> str:
        return "wrapped-local"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_file(self, path: str):
        return self._file(path)

    def open_input_stream(self, path: str):
        return self._file(path)

    def __getattr__(self, name: str):
        return getattr(self.local, name)


def _through(monkeypatch, handler: _WrappedLocalFs) -> None:
    """Every shard read of hdd_ray goes through ``handler`` (as to an object store)."""
    import pyarrow.fs as pafs

    from hdd_ray import storage

    names = ("get_type_name", "normalize_path", "get_file_info", "get_file_info_selector",
             "open_input_file", "open_input_stream", "create_dir", "delete_dir",
             "delete_dir_contents", "delete_root_dir_contents", "delete_file", "move",
             "copy_file", "open_output_stream", "open_append_stream")
    methods = {n: (lambda self, *a, _n=n, **k: getattr(handler, _n)(*a, **k)) for n in names}
    handler_class = type("Handler", (pafs.FileSystemHandler,), methods)
    fs = pafs.PyFileSystem(handler_class())
    monkeypatch.setattr(storage, "resolve", lambda path: (fs, str(path)))


def test_shards_are_read_in_large_buffered_requests(tmp_path, monkeypatch):
    """tarfile reads 10 KB at a time: one ranged GET each on an object store (~100,000 for a
    1 GB shard). Through the reader, one request per 8 MB (and one at the end)."""
    from hdd_ray import storage
    from hdd_ray.corpus import iter_samples, iter_tar

    paths = _shards(tmp_path, [200])  # ~0.6 MB
    handler = _WrappedLocalFs()
    _through(monkeypatch, handler)
    fs, inner = storage.resolve(paths[0])
    with fs.open_input_stream(inner) as f:  # how shards were read before: tarfile on the stream
        assert sum(1 for _ in iter_tar(f, paths[0])) == 200
    unbuffered, handler.reads, handler.opens = handler.reads, 0, 0
    assert len(list(iter_samples(paths[0]))) == 200
    assert handler.opens == 1 and handler.reads <= 3, handler.reads
    assert unbuffered >= 20 * handler.reads, (unbuffered, handler.reads)
    # the stream of a training run reads the same way
    source = _stream(paths)
    handler.reads = 0
    assert len(_keys(source, 40)) == 200
    source.close()
    assert handler.reads <= 3 * len(paths) * 2  # every pass: a few requests per shard


def test_transient_read_errors_are_retried_and_only_persistent_ones_count_as_damage(
        tmp_path, monkeypatch, caplog):
    import logging

    from hdd_ray import corpus
    from hdd_ray.samples import read_samples

    monkeypatch.setattr(corpus, "READ_BACKOFF_S", 0.01)
    paths = _shards(tmp_path, [12, 9])
    flaky = _WrappedLocalFs(fail_reads=2)  # the first two requests fail, then all succeed
    _through(monkeypatch, flaky)
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        arrays, captions, _, skipped = read_samples([(p, 0) for p in paths], HOW)
    assert skipped == 0 and sorted(captions) == [f"s{i:05d}" for i in range(21)]
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 2 and "connection reset by peer" in retried[0]
    # a failure mid-shard: the shard is opened again and read on from the byte it had reached
    monkeypatch.setattr(corpus, "READ_BUFFER_BYTES", 4096)
    midway = _WrappedLocalFs(fail_on=(3, 7))
    _through(monkeypatch, midway)
    arrays2, captions2, _, skipped = read_samples([(p, 0) for p in paths], HOW)
    assert skipped == 0 and captions2 == captions
    assert all(np.array_equal(a, b) for a, b in zip(arrays2, arrays, strict=True))
    assert midway.opens == 2 + 2  # each shard once, and once more after each failure
    caplog.clear()
    dead = _WrappedLocalFs(always_fail=True)  # a store that never answers: damage, told once
    _through(monkeypatch, dead)
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        _, captions, _, skipped = read_samples([(p, 0) for p in paths], HOW)
    assert captions == [] and skipped == 2  # one unreadable shard each
    assert dead.reads == corpus.READ_ATTEMPTS * 2  # every attempt, then given up
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == 2 and all("connection reset by peer" in m for m in skips)
    assert all("\n" not in m for m in skips)


def test_every_skipped_sample_of_a_stream_is_logged_once_with_its_reason(tmp_path, caplog):
    import logging

    paths = _with_a_damaged_shard(tmp_path)
    source = _stream(paths)
    total = 9 + 14 + 11 + 1  # good samples: two passes over them
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        _keys(source, 1)
        time.sleep(0.5)  # the producer runs ahead: its warnings must wait, never be dropped
        _keys(source, 2 * total // 5 - 1)
    source.close()
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert source.skipped == 1 and len(skips) == 1, skips  # once, though read on every pass
    assert "bad-000.tar: sample 'broken' skipped:" in skips[0]
