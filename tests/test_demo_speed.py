"""The demo's speed work keeps results exact: the fused EMA and AdamW, the launcher's queue order
and its one-node preemption-watcher switch (benchmarks/README.md, "Demo main job")."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

from hdd_ray.config import TrainConfig
from hdd_ray.models.expert import ExpertModel
from hdd_ray.placement import ResourceGate
from hdd_ray.training import launcher
from hdd_ray.training.loop import EMA, _adamw

TEXT = {"encoder": "learned", "vocab_size": 64, "max_len": 8, "dim": 32, "depth": 1}


def _model(seed: int = 0) -> ExpertModel:
    torch.manual_seed(seed)
    return ExpertModel("DiT-T/2", TEXT, 8, 1)


def test_ema_update_is_the_per_parameter_lerp_bit_for_bit():
    model = _model()
    ema = EMA(model, 0.97)
    reference = copy.deepcopy(model).requires_grad_(False)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model.data_mean.fill_(float(step))
        ema.update(model)
        with torch.no_grad():
            for e, p in zip(reference.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - 0.97)
    averaged = ema.state_dict()
    for name, b in reference.named_parameters():
        assert torch.equal(averaged[name], b), name
    # exported: the average in place of every parameter, the live model's buffers
    exported = ema.exported(model)
    assert torch.equal(exported["data_mean"], model.data_mean)
    assert all(torch.equal(exported[k], v) for k, v in averaged.items())
    # loading a checkpoint's weights into the average keeps updating the loaded tensors
    ema.load(model.state_dict())
    ema.update(model)
    assert torch.equal(ema.state_dict()["net.final_layer.linear.weight"],
                       model.net.final_layer.linear.weight)


def test_ema_refuses_another_architecture():
    ema = EMA(_model(), 0.9)
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(2, 2))


def test_fused_adamw_follows_the_reference_adamw():
    fast, slow = _model(1), _model(1)
    opt_fast = _adamw(list(fast.parameters()), 1e-3, 0.01)
    opt_slow = torch.optim.AdamW(slow.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000
    cond = fast.tokenize(["a handwritten digit seven"] * 4)
    for _ in range(5):
        for model, opt in ((fast, opt_fast), (slow, opt_slow)):
            opt.zero_grad()
            ((model(x, t, cond) - x) ** 2).mean().backward()
            opt.step()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_longest_runs_are_queued_first():
    def job(steps: int, batch: int) -> SimpleNamespace:
        return SimpleNamespace(settings=SimpleNamespace(train=TrainConfig(steps=steps, batch_size=batch)))

    router, expert = job(800, 128), job(800, 64)
    assert launcher._work(router) == 2 * launcher._work(expert)
    assert launcher._work(job(400, 64)) * 2 == launcher._work(expert)


def test_preemption_watcher_is_off_only_on_a_one_node_local_instance(monkeypatch):
    key = launcher.PREEMPTION_WATCHER_ENV
    monkeypatch.delenv(key, raising=False)
    one = ResourceGate({"CPU": 2.0})
    with launcher._no_preemption_watcher_on_one_node(one):
        assert os.environ[key] == "0"
    assert key not in os.environ  # restored: later campaigns in this process are unaffected
    two = ResourceGate([{"resources": {"CPU": 2.0}}, {"resources": {"CPU": 2.0}}])
    for gate in (two, None):  # several nodes (a drain is survivable) or a cluster: unchanged
        with launcher._no_preemption_watcher_on_one_node(gate):
            assert key not in os.environ
    monkeypatch.setenv(key, "1")  # what the user set wins
    with launcher._no_preemption_watcher_on_one_node(one):
        assert os.environ[key] == "1"
