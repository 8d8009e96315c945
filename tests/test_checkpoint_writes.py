"""Checkpoints written in the background (``train.async_checkpoint``,
hdd_ray/training/writer.py): training goes on while a checkpoint is written, what is written is
the state of its step, the drain and final checkpoints are on storage when the loop goes on or
returns, a failed write is one line. A plain process (``LocalHooks``, ``TaskHooks``) and Ray
Train (real local Ray: its ``ASYNC`` upload with our upload function).

The writes are slowed by gating the checkpoint's serialisation
(``checkpoints.checkpoint_writers``) on the loop's progress: under synchronous writes the loop
never progresses while it writes, so each test fails rather than waits long.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict

import pytest
import torch
from helpers_corpus import write_digit_shard

from hdd_ray.config import load_config, resolve_experts
from hdd_ray.errors import CheckpointWriteError
from hdd_ray.training import checkpoints
from hdd_ray.training import loop as loop_module
from hdd_ray.training.loop import LocalHooks, TaskHooks, run_loop
from hdd_ray.training.settings import RunSettings

#: how long a gated write waits for the loop to move on (the test fails at the end of it)
PATIENCE_S = 10.0


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_digit_shard(str(tmp_path_factory.mktemp("shards") / "shard-000000.tar"),
                             3, 64, "a handwritten digit three")


def _settings(shard: str, steps: int = 30, every: int = 10, asynchronous: bool = True,
              **extra) -> RunSettings:
    cfg = load_config(overrides=["experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    train = dict(expert.train, steps=steps, checkpoint_every=every, batch_size=16,
                 async_checkpoint=asynchronous)
    return RunSettings.from_dict({"kind": "expert", "expert": asdict(expert), "train": train,
                                  "image_size": 8, "channels": 1, "shards": [shard],
                                  "torch_threads": 1, **extra})


class Progress:
    """The loop's steps as they start (``_Run.step`` wrapped) and the checkpoints it
    serialises (``checkpoint_writers`` wrapped): a write of a step in ``gate`` waits until the
    loop has started ``ahead`` more steps (for :data:`PATIENCE_S` at most); ``delay_s`` slows
    every write; ``fail`` makes writes fail."""

    def __init__(self, monkeypatch, gate=(), ahead: int = 5, delay_s: float = 0.0,
                 fail: Exception | None = None) -> None:
        self.started = -1
        self.moved_on: dict[int, bool] = {}  # checkpoint step -> the loop moved on meanwhile
        self.written: dict[int, dict] = {}  # checkpoint step -> what was serialised
        self.writing, self.most_at_once = 0, 0
        self.on_step = None
        self._gate, self._ahead, self._delay, self._fail = set(gate), ahead, delay_s, fail
        self._cond = threading.Condition()
        step, writers = loop_module._Run.step, checkpoints.checkpoint_writers

        def counted_step(run, i):
            if self.on_step is not None:
                self.on_step(i)
            with self._cond:
                self.started = i
                self._cond.notify_all()
            return step(run, i)

        def gated_writers(state):
            at, files = int(state["step"]), writers(state)
            write_ema = files[checkpoints.EMA_FILE]

            def ema(path: str) -> None:
                with self._cond:
                    self.writing += 1
                    self.most_at_once = max(self.most_at_once, self.writing)
                    if at in self._gate:
                        self.moved_on[at] = self._cond.wait_for(
                            lambda: self.started >= at + self._ahead, PATIENCE_S)
                try:
                    time.sleep(self._delay)
                    if self._fail is not None:
                        raise self._fail
                    write_ema(path)
                    with open(path, "rb") as f:
                        self.written[at] = checkpoints.read_export(f.read()).weights
                finally:
                    with self._cond:
                        self.writing -= 1

            return {**files, checkpoints.EMA_FILE: ema}

        monkeypatch.setattr(loop_module._Run, "step", counted_step)
        monkeypatch.setattr(checkpoints, "checkpoint_writers", gated_writers)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_goes_on_while_a_checkpoint_is_written_and_writes_what_sync_writes(
        shard, tmp_path, monkeypatch):
    """The loop trains past a checkpoint's step while it is written, one write at a time, and
    every checkpoint (its EMA) and the last state on disk equal the synchronous run's."""
    progress = Progress(monkeypatch, gate=(10, 20))
    hooks = LocalHooks(str(tmp_path / "async"))
    run_loop(_settings(shard), hooks)
    assert progress.moved_on == {10: True, 20: True}  # 5 steps on while 10 and 20 were written
    assert progress.most_at_once == 1
    monkeypatch.undo()
    sync = Progress(monkeypatch)
    plain = LocalHooks(str(tmp_path / "sync"))
    run_loop(_settings(shard, asynchronous=False), plain)
    assert sorted(progress.written) == sorted(sync.written) == [10, 20, 30]
    for step in (10, 20, 30):  # later steps never changed what was being written
        assert _same(progress.written[step], sync.written[step]), step
    a, b = hooks.load_state(), plain.load_state()
    assert a["step"] == b["step"] == 30
    assert _same(a["model"], b["model"]) and _same(a["ema"], b["ema"])
    for i, moments in a["optimizer"]["state"].items():
        assert _same(moments, b["optimizer"]["state"][i]), i
    assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["torch_rng"], b["torch_rng"])


def test_the_drain_and_final_checkpoints_are_on_disk_before_the_loop_goes_on(
        shard, tmp_path, monkeypatch):
    """A drain's checkpoint is written before the next step, the last one before the loop
    returns (the task executor's, with its metrics), however slow the write."""
    progress = Progress(monkeypatch, delay_s=0.5)
    run = tmp_path / "run"
    on_disk: dict[int, int | None] = {}

    def look(i: int) -> None:
        if i == 10:  # the step after the drain's checkpoint
            on_disk[i] = (checkpoints.task_checkpoint_metrics(str(run)) or {}).get("step")

    progress.on_step = look

    class Drained(TaskHooks):
        def preempted(self) -> bool:  # the node's drain notice at step 10
            return True

    run_loop(_settings(shard, steps=20, every=1000), Drained(str(run)))
    assert on_disk == {10: 10}
    assert checkpoints.task_checkpoint_metrics(str(run))["step"] == 20
    assert checkpoints.task_checkpoint_state(str(run))["step"] == 20
    assert sorted(progress.written) == [10, 20]


def test_a_loop_that_fails_still_completes_the_write_in_flight(shard, tmp_path, monkeypatch):
    progress = Progress(monkeypatch, delay_s=0.5)

    def fail(i: int) -> None:
        if i == 12:
            raise RuntimeError("the node's disk went away")

    progress.on_step = fail
    hooks = LocalHooks(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="disk went away"):
        run_loop(_settings(shard), hooks)
    assert hooks.load_state()["step"] == 10


def test_a_failed_write_is_raised_in_one_line(shard, tmp_path, monkeypatch):
    """Not dropped: the loop raises it (at the next checkpoint or its end) in one line naming
    the step, the place and the cause."""
    Progress(monkeypatch, fail=OSError(28, "No space left on device"))
    directory = str(tmp_path / "run")
    with pytest.raises(CheckpointWriteError) as raised:
        run_loop(_settings(shard), LocalHooks(directory))
    assert str(raised.value) == (f"checkpoint of step 10 to {directory} not written: OSError: "
                                 "[Errno 28] No space left on device")


# ---------------------------------------------------------------------------------- Ray Train


@pytest.mark.ray
def test_under_ray_train_training_goes_on_while_ray_uploads_and_every_checkpoint_registers(
        shard, tmp_path, monkeypatch, ray_local):
    """Ray Train's ``ASYNC`` upload with our upload function: the worker trains 5 steps past
    checkpoint 10 while it is written (else the write fails the run), checkpoints 10, 20 and 30
    are registered in order with the synchronous run's weights, and the last one is written
    before ``fit`` returns."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = _settings(shard)

    def train_fn() -> None:  # in the worker: the gate of Progress, for checkpoint 10
        from hdd_ray.training import checkpoints as ckpt
        from hdd_ray.training import loop

        started = threading.Event()
        step, writers = loop._Run.step, ckpt.checkpoint_writers

        def counted_step(run, i):
            if i >= 15:
                started.set()
            return step(run, i)

        def gated_writers(state):
            if int(state["step"]) == 10 and not started.wait(20):
                raise RuntimeError("the loop stood still while checkpoint 10 was written")
            return writers(state)

        loop._Run.step, ckpt.checkpoint_writers = counted_step, gated_writers
        loop.train_loop(settings)

    trainer = TorchTrainer(train_fn, scaling_config=ScalingConfig(
                               num_workers=1, resources_per_worker={"CPU": 0.25}),
                           run_config=RunConfig(name="async", storage_path=str(tmp_path),
                                                checkpoint_config=CheckpointConfig()))
    result = trainer.fit()
    assert result.error is None, result.error
    # the same run, synchronous, in this process (CPU: the same bits)
    sync = Progress(monkeypatch)
    run_loop(_settings(shard, asynchronous=False), LocalHooks(str(tmp_path / "sync")))
    registered = [(m["step"], c) for c, m in result.best_checkpoints]
    assert [s for s, _ in registered] == [10, 20, 30]
    for step, checkpoint in registered:
        state = checkpoints.read_checkpoint(checkpoint.path)
        assert state["step"] == step and _same(state["ema"], sync.written[step]), step
    assert checkpoints.result_export(result).step == 30
