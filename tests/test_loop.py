"""The training loop itself, in a plain process (no Ray): resume is exact, the objective is the
objective's business, and the loop reports what the launcher relies on."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from helpers_corpus import write_digit_shard
from PIL import Image

from hdd_ray.config import load_config, resolve_experts
from hdd_ray.corpus import iter_samples
from hdd_ray.training.loop import LocalHooks, run_loop
from hdd_ray.training.settings import RunSettings


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_digit_shard(str(tmp_path_factory.mktemp("shards") / "shard-000000.tar"),
                             3, 64, "a handwritten digit three")


def _config(shard: str, objective: str, steps: int) -> RunSettings:
    cfg = load_config(overrides=[f"experts.objective={objective}", "experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    from dataclasses import asdict

    train = dict(expert.train, steps=steps, checkpoint_every=10, batch_size=16)
    return RunSettings.from_dict({"kind": "expert", "expert": asdict(expert), "train": train,
                                  "image_size": 8, "channels": 1, "shards": [shard],
                                  "torch_threads": 1})


@pytest.mark.parametrize("objective", ["fm_velocity", "ddpm_eps"])
def test_resume_continues_exactly_where_the_checkpoint_left_off(shard, tmp_path, objective):
    straight = LocalHooks(str(tmp_path / "straight"))
    run_loop(_config(shard, objective, 30), straight)
    split = LocalHooks(str(tmp_path / "split"))
    run_loop(_config(shard, objective, 20), split)  # "preempted" after its step-20 checkpoint
    last = run_loop(_config(shard, objective, 30), split)  # resumed
    a, b = straight.load_state(), split.load_state()
    assert a["step"] == b["step"] == 30 and last["step"] == 30
    assert [h["start_step"] for h in b["history"]] == [0, 20]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bit-identical
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_loop_reports_at_every_checkpoint_and_a_finished_run_does_no_more_work(shard, tmp_path):
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(_config(shard, "fm_velocity", 25), hooks)
    assert [r["step"] for r in hooks.reports] == [10, 20, 25]
    assert hooks.reports[-1]["final"] and hooks.reports[-1]["steps_per_s"] > 0
    before = hooks.load_state()
    hooks.reports.clear()
    run_loop(_config(shard, "fm_velocity", 25), hooks)  # e.g. a re-run after the driver died
    assert [r["step"] for r in hooks.reports] == [25]
    after = hooks.load_state()
    assert all(torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])


def test_an_expert_carries_its_data_mean_through_training_export_and_loading(shard, tmp_path, caplog):
    """The conversion's prior near t = 1: the cluster's mean image, set by the training task,
    kept by the EMA, exported with the weights; files exported before it still load."""
    import logging

    from hdd_ray.diffusion import get_objective
    from hdd_ray.models.expert import ExpertModel, load_weights, save_weights
    from hdd_ray.samples import read_cluster

    config = _config(shard, "ddpm_eps", 10)
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(config, hooks)
    # the exact mean of the cluster (uint8 sums in float64), not a float32 reduction
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(s["png"])))
                                        for s in iter_samples(shard)]))
    mean = (pixels.to(torch.float64).mean(0) / 127.5 - 1.0).float()[None]
    assert torch.allclose(mean, read_cluster([shard], 8, 1).images.mean(0), atol=1e-6)
    ema = hooks.load_state()["ema"]
    assert torch.equal(ema["data_mean"], mean)

    def build() -> ExpertModel:
        return ExpertModel(config.expert.model, config.expert.text, 8, 1)

    assert build().prior_mean() is None  # unknown until set or loaded
    trained = build()
    trained.load_state_dict(ema)  # what the launcher exports
    save_weights(str(tmp_path / "w.safetensors"), trained.exported_state())
    loaded = build()
    load_weights(loaded, str(tmp_path / "w.safetensors"), "expert c0")
    assert torch.equal(loaded.prior_mean(), mean)
    # read through the conversion: at pure noise the velocity is x - E[x0]
    field = get_objective("ddpm_eps", "cosine").velocity_field(loaded, None, loaded.prior_mean())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        v = field(x, torch.ones(4), loaded.tokenize(["a digit"] * 4))
    assert torch.allclose(v, x - mean, atol=1e-5)

    old = {k: v for k, v in trained.exported_state().items() if k != "data_mean"}
    save_weights(str(tmp_path / "old.safetensors"), old)  # exported before experts had a mean
    older = build()
    with caplog.at_level(logging.WARNING, logger="hdd_ray.models.expert"):
        load_weights(older, str(tmp_path / "old.safetensors"), "expert old")
    assert older.prior_mean() is None and "carry no data_mean" in caplog.text
    assert all(torch.equal(older.state_dict()[k], old[k]) for k in old)


def test_task_hooks_resume_exactly_and_take_the_newest_checkpoint_of_either_executor(
        shard, tmp_path, caplog):
    """``ray.executor=task``'s hooks: checkpoints in ``<run>/checkpoint_task/`` resume exactly;
    a Ray Train checkpoint of the same run that is further along wins over the task's."""
    from hdd_ray.training.checkpoints import (
        RAY_TRAIN_SNAPSHOT,
        STATE_FILE,
        TASK_CHECKPOINT,
        newest_state,
        task_checkpoint_metrics,
        write_checkpoint,
    )
    from hdd_ray.training.loop import TaskHooks

    straight = LocalHooks(str(tmp_path / "straight"))
    run_loop(_config(shard, "fm_velocity", 30), straight)
    run = tmp_path / "run"
    run_loop(_config(shard, "fm_velocity", 20), TaskHooks(str(run)))  # "killed" after step 20
    assert task_checkpoint_metrics(str(run))["step"] == 20
    last = run_loop(_config(shard, "fm_velocity", 30), TaskHooks(str(run)))
    a, b = straight.load_state(), TaskHooks(str(run)).load_state()
    assert last["step"] == b["step"] == 30 and [h["start_step"] for h in b["history"]] == [0, 20]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # a Ray Train checkpoint registered in the same directory at step 40 is newer: it wins
    ckpt = run / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir()
    write_checkpoint(str(ckpt), {**b, "step": 40})
    (run / RAY_TRAIN_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {
        "checkpoint_dir_name": ckpt.name, "metrics": {"step": 40}}}))
    assert TaskHooks(str(run)).load_state()["step"] == 40
    # a damaged Ray Train checkpoint is skipped with a one-line warning, the task's own is used
    (ckpt / STATE_FILE).write_bytes(b"not a torch file")
    import logging

    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        assert TaskHooks(str(run)).load_state()["step"] == 30
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and "Ray Train's latest checkpoint" in warned[0]
    assert "\n" not in warned[0]
    assert (run / TASK_CHECKPOINT / STATE_FILE).exists()
    assert newest_state(None, None) is None
    assert newest_state({"step": 3}, None, {"step": 7})["step"] == 7


def test_the_ema_averages_trainable_weights_only_and_the_export_reads_its_file_alone(
        shard, tmp_path):
    """A frozen part (an open_clip tower) is neither copied nor averaged; a checkpoint keeps
    the EMA in its own file, which is all the export reads (no optimizer state)."""
    from torch import nn

    from hdd_ray.models.expert import ExpertModel
    from hdd_ray.training.checkpoints import (
        EMA_FILE,
        STATE_FILE,
        TASK_CHECKPOINT,
        task_checkpoint_export,
    )
    from hdd_ray.training.loop import EMA, TaskHooks

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)  # frozen
    ema = EMA(model, decay=0.5)
    assert ema.names == ["1.weight", "1.bias"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    out = ema.exported(model)
    assert torch.equal(out["0.weight"], model[0].weight)  # the live frozen weights
    assert torch.allclose(out["1.weight"], start["1.weight"] + 0.5)  # halfway: decay 0.5
    cfg = _config(shard, "fm_velocity", 10)
    expert = ExpertModel(cfg.expert.model, cfg.expert.text, 8, 1)
    expert.text.requires_grad_(False)
    expert.text_frozen = True  # as with an open_clip tower
    frozen = EMA(expert, 0.9)
    assert frozen.names and not any(n.startswith("text.") for n in frozen.names)
    assert set(frozen.exported(expert)) == set(expert.exported_state())

    run = tmp_path / "run"
    run_loop(cfg, TaskHooks(str(run)))
    state = torch.load(run / TASK_CHECKPOINT / STATE_FILE, weights_only=True)
    assert "ema" not in state and "optimizer" in state  # the average is saved once
    assert (run / TASK_CHECKPOINT / EMA_FILE).exists()
    ema_before = TaskHooks(str(run)).load_state()["ema"]
    (run / TASK_CHECKPOINT / STATE_FILE).unlink()  # the export never needs it
    final = task_checkpoint_export(str(run))
    assert final.step == 10 and [h["start_step"] for h in final.history] == [0]
    live = state["model"]  # the average is not the live weights; buffers are the live ones
    assert any(not torch.equal(final.weights[k], live[k]) for k in final.weights
               if k != "data_mean")
    assert torch.equal(final.weights["data_mean"], live["data_mean"])
    trained = ExpertModel(cfg.expert.model, cfg.expert.text, 8, 1)  # its text encoder learned
    assert set(final.weights) == set(trained.exported_state())
    assert all(torch.equal(final.weights[k], ema_before[k]) for k in final.weights)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_null_caption_is_trained_only_with_caption_dropout(shard, tmp_path, dropout):
    """Without caption dropout ``y_null`` is never used: it is not trained (DDP would wait for
    its gradient; weight decay would shrink it), so it leaves the run as it was initialised."""
    from hdd_ray.models.expert import ExpertModel

    cfg = _config(shard, "fm_velocity", 10)
    cfg.train.caption_dropout, cfg.train.weight_decay = dropout, 0.1
    hooks = LocalHooks(str(tmp_path / "run"))
    run_loop(cfg, hooks)
    torch.manual_seed(cfg.train.seed)  # the loop's seed before it builds the model
    fresh = ExpertModel(cfg.expert.model, cfg.expert.text, 8, 1)
    trained = hooks.load_state()
    unchanged = torch.equal(trained["model"]["net.y_null"], fresh.net.y_null)
    assert unchanged == (dropout == 0)
    assert torch.equal(trained["ema"]["net.y_null"], trained["model"]["net.y_null"]) == (
        dropout == 0)  # not averaged either


def test_learning_rate_schedules_warm_up_and_decay_by_step_alone(shard, tmp_path):
    from hdd_ray.optim import learning_rate

    tr = {"lr": 1e-3, "steps": 100, "warmup_steps": 10, "lr_schedule": "cosine"}
    lrs = [learning_rate(s, **tr) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert lrs[50] == pytest.approx(5e-4) and 0 < lrs[99] < 1e-6  # cosine to ~0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert learning_rate(77, lr=3e-4, steps=100) == 3e-4  # constant, the old default
    # resume under a schedule is exact: the rate is a function of the step
    cfg = _config(shard, "fm_velocity", 30)
    cfg.train.lr_schedule, cfg.train.warmup_steps = "cosine", 5
    from hdd_ray.training.loop import TaskHooks

    straight = TaskHooks(str(tmp_path / "straight"))  # (its metrics are written as JSON)
    run_loop(cfg, straight)

    class Killed(Exception):
        pass

    class KilledAfterStep10(LocalHooks):
        def report(self, metrics, state, wait=False):
            super().report(metrics, state, wait)
            if metrics["step"] == 10:
                raise Killed

    with pytest.raises(Killed):
        run_loop(cfg, KilledAfterStep10(str(tmp_path / "split")))
    split = LocalHooks(str(tmp_path / "split"))
    run_loop(cfg, split)
    a, b = straight.load_state(), split.load_state()
    assert [h["start_step"] for h in b["history"]] == [0, 10]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    plain = LocalHooks(str(tmp_path / "plain"))  # no schedule: other weights
    run_loop(_config(shard, "fm_velocity", 30), plain)
    assert not all(torch.equal(a["ema"][k], plain.load_state()["ema"][k]) for k in a["ema"])


def test_a_training_step_reads_nothing_back_from_the_device_between_logging_intervals(
        shard, tmp_path, monkeypatch):
    """On a GPU a host read of a tensor (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
    ``.nonzero()``) waits for every kernel queued before it: the loop may read its losses once
    per logging interval, never inside a step. Counted on CPU by patching those methods. The
    data sources' own reads are not counted: they read host tensors on every device (sample
    indices drawn by the rank's CPU data generator, hdd_ray/training/data.py), which never
    wait on the GPU."""
    import sys

    from hdd_ray.training import data, loop

    reads = {"in_step": [], "elsewhere": 0}
    inside = [False]

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            host_data = sys._getframe(1).f_code.co_filename == data.__file__
            if inside[0] and not host_data:
                reads["in_step"].append(name)
            else:
                reads["elsewhere"] += 1
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_step = loop._Run.step

    def step(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop._Run, "step", step)
    hooks = LocalHooks(str(tmp_path / "run"))
    for objective in ("fm_velocity", "ddpm_eps"):  # each objective's batch and loss
        run_loop(_config(shard, objective, 20), LocalHooks(str(tmp_path / objective)))
    assert reads["in_step"] == []
    assert reads["elsewhere"] > 0  # the patch sees reads: those of the logging intervals
    last = run_loop(_config(shard, "fm_velocity", 20), hooks)
    assert last["loss"] == last["loss"] and last["loss"] > 0  # a real, finite smoothed loss


def test_the_loop_reports_the_share_of_its_time_spent_waiting_for_data(shard, tmp_path,
                                                                       monkeypatch):
    """``data_wait_share``: the host time the loop spends getting its batches over its wall
    time. A data source that makes each batch wait 50 ms shows a share near 1; the same run
    without the wait, a small one."""
    from hdd_ray.training import loop

    quick = run_loop(_config(shard, "fm_velocity", 10), LocalHooks(str(tmp_path / "quick")))
    real_draw = loop.ExpertTask.draw

    def slow_draw(self, *args, **kwargs):
        time.sleep(0.05)
        return real_draw(self, *args, **kwargs)

    monkeypatch.setattr(loop.ExpertTask, "draw", slow_draw)
    slow = run_loop(_config(shard, "fm_velocity", 10), LocalHooks(str(tmp_path / "slow")))
    assert 0 <= quick["data_wait_share"] < 0.5 < slow["data_wait_share"] <= 1
    assert slow["data_wait_share"] > quick["data_wait_share"] + 0.2


def test_a_model_that_fails_to_compile_trains_eagerly_after_one_warning_line(monkeypatch, caplog):
    """``train.compile`` is on by default (applied on CUDA): a compiler failure at the first
    call runs that same call eagerly, with one warning line, and every later call too; an
    error the eager model raises as well still fails the step."""
    import logging

    from hdd_ray.config import TrainConfig
    from hdd_ray.training.speed import CompiledOrEager, unwrap

    assert TrainConfig().compile is True
    calls = []

    def broken_compile(model):
        def compiled(*args, **kwargs):
            calls.append("compiled")
            raise RuntimeError("backend='inductor' raised:\nCppCompileError: no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = torch.nn.Linear(3, 2)
    model = CompiledOrEager(net)
    x = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        assert torch.equal(model(x), net(x))
        assert torch.equal(model(x), net(x))
    assert calls == ["compiled"]  # tried once, eager from then on
    warned = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert warned == ["torch.compile failed (RuntimeError: backend='inductor' raised:): "
                      "training without it"]
    assert unwrap(model) is net and model.train(False) is model and not net.training
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(torch.randn(4, 5))  # the eager model's own error
    assert not model.fall_back(RuntimeError("again"))  # eager already: raised as it is
    # out of memory is no compiler failure: raised, compilation stays on
    fresh = CompiledOrEager(net)
    assert not fresh.fall_back(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert fresh.failed is None
    # the backward's lazy compilation failing: the loop runs the micro-batch again eagerly
    assert fresh.fall_back(RuntimeError("backward compile failed")) and fresh.failed


def _tiny_clip_weights(folder) -> tuple[str, str]:
    """A tiny open_clip architecture (a config file) and its weights file, made here."""
    import open_clip

    from hdd_ray.models.text import TINY_OPEN_CLIP_CONFIG

    arch = folder / "hdd-tiny-clip-loop.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(str(arch))
    torch.manual_seed(3)
    weights = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model("hdd-tiny-clip-loop", pretrained=None).state_dict(),
               weights)
    return str(arch), str(weights)


def test_a_frozen_text_tower_expert_trains_from_stored_features_with_the_captions_loss(
        tmp_path, monkeypatch):
    """Prepare stores a frozen tower's features beside each sample; training reads them and
    never runs the tower, and its losses and weights are those of training from captions (up
    to the float16 storage of the features)."""
    from dataclasses import asdict

    from hdd_ray.campaign import text_features_record
    from hdd_ray.corpus import write_tar
    from hdd_ray.models.text import OpenCLIPTextEncoder
    from hdd_ray.models.text_features import TEXT_MEMBER, TextFeatureEncoder

    arch, weights = _tiny_clip_weights(tmp_path)
    cfg = load_config(overrides=["experts.objective=fm_velocity", "experts.ddpm_clusters=[]",
                                 "experts.text.encoder=open_clip", f"experts.text.arch={arch}",
                                 f"experts.text.pretrained={weights}"])
    expert = resolve_experts(cfg)[0]
    record = text_features_record(expert.text)
    assert record["width"] == 64 and record["context_length"] == 16
    # a shard as prepare writes it with this tower: captions of several lengths, features beside
    plain = write_digit_shard(str(tmp_path / "plain.tar"), 3, 48, "x")
    encode = TextFeatureEncoder(record)
    samples = []
    for i, s in enumerate(iter_samples(plain)):
        caption = " ".join(["a handwritten digit three"] + ["seen twice"] * (i % 4))
        samples.append({"__key__": s["__key__"], "png": s["png"], "json": s["json"],
                        "txt": caption.encode(), TEXT_MEMBER: encode([caption])[0]})
    shard = write_tar(str(tmp_path / "shard-000000.tar"), samples) and \
        str(tmp_path / "shard-000000.tar")

    def run(stored: bool) -> LocalHooks:
        train = dict(expert.train, steps=20, checkpoint_every=10, batch_size=16,
                     caption_dropout=0.2)
        settings = RunSettings.from_dict({
            "kind": "expert", "expert": asdict(expert), "train": train, "image_size": 8,
            "channels": 1, "shards": [shard], "torch_threads": 1,
            "text_features": record if stored else None})
        hooks = LocalHooks(str(tmp_path / f"run-{stored}"))
        run_loop(settings, hooks)
        return hooks

    captions = run(stored=False)
    calls = []
    real_forward = OpenCLIPTextEncoder.forward
    monkeypatch.setattr(OpenCLIPTextEncoder, "forward",
                        lambda self, ids: calls.append(1) or real_forward(self, ids))
    stored = run(stored=True)
    assert not calls  # the tower never ran
    a, b = captions.reports, stored.reports
    assert [r["step"] for r in a] == [r["step"] for r in b] == [10, 20]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-3 * abs(ra["loss"]), (ra["loss"], rb["loss"])
    wa, wb = captions.load_state()["model"], stored.load_state()["model"]
    for key in wa:
        if not key.startswith("text."):
            assert torch.allclose(wa[key], wb[key], atol=1e-3), key
