"""Randomness and devices: every draw goes through ``hdd_ray.devices``, which draws on the
generator's device and moves the result, so no kernel ever meets a generator of another device.

A CPU machine cannot provoke the CUDA error ("Expected a 'cuda' device type for generator but
found 'cpu'"), and the ``meta`` device does not raise it either; what these tests guard is the
mechanism: no draw bypasses the helper, and the helper honours the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hdd_ray import devices
from hdd_ray.config import load_config
from hdd_ray.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "hdd_ray"
RANDOM_CALLS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like",
                "randint_like", "multinomial", "normal", "bernoulli", "poisson", "Generator"}


def _direct_draws(path: Path) -> list[str]:
    """``torch.<random>(...)`` calls and ``generator=`` arguments outside ``nn.Parameter(...)``
    initialisers (weights are drawn on the CPU at construction, before any ``.to(device)``)."""
    tree = ast.parse(path.read_text())
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "Parameter":
            allowed.update(id(n) for arg in node.args for n in ast.walk(arg))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in allowed:
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in RANDOM_CALLS \
                and isinstance(func.value, ast.Name) and func.value.id == "torch":
            found.append(f"{path.name}:{node.lineno} torch.{func.attr}")
        if any(kw.arg == "generator" for kw in node.keywords):
            found.append(f"{path.name}:{node.lineno} generator=")
    return found


def test_no_random_draw_in_the_package_bypasses_the_devices_module():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "devices.py"
                 for hit in _direct_draws(path)]
    assert offenders == [], "draw through hdd_ray.devices instead: " + ", ".join(offenders)


def test_the_scan_sees_a_direct_draw_and_allows_weight_initialisation(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom torch import nn\n"
                     "w = nn.Parameter(torch.randn(3))\n"
                     "x = torch.rand(3, generator=g)\n"
                     "y = objective.loss(net, x0, generator=g)\n")
    assert _direct_draws(probe) == ["probe.py:4 torch.rand", "probe.py:4 generator=",
                                    "probe.py:5 generator="]


def test_a_draw_is_made_on_the_generators_device_and_returned_on_the_device_asked_for():
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    # a CPU generator feeding another device: drawn on the CPU, then moved (meta stands in
    # for cuda here: it has no data, but the placement is what is checked)
    moved = devices.randn((2, 3), devices.generator(5), "meta")
    assert moved.device.type == "meta" and moved.shape == (2, 3)
    same = devices.randn((2, 3), devices.generator(5), "cpu")
    assert torch.equal(same, expected)  # the CPU stream is the plain torch stream, bit for bit
    g = devices.generator(1)
    assert devices.rand(4, g).device.type == "cpu"  # no device: stays on the generator's
    idx = devices.randint(10, 6, devices.generator(2), "meta")
    assert idx.device.type == "meta" and idx.dtype == torch.long
    perm = devices.randperm(7, devices.generator(3))
    assert sorted(perm.tolist()) == list(range(7))
    assert devices.randn(3, None, "cpu", torch.float64).dtype == torch.float64


def test_training_streams_are_one_generator_on_the_cpu_and_resume_exactly():
    streams = devices.TrainingStreams(seed=3, rank=0, device="cpu")
    assert streams.shared and streams.noise is streams.data
    plain = torch.Generator().manual_seed(devices.stream_seed(3, 0))
    assert torch.equal(devices.rand(5, streams.noise), torch.rand(5, generator=plain))
    state = streams.state()
    assert set(state) == {"rng"}
    ahead = devices.randn(4, streams.noise)
    again = devices.TrainingStreams(seed=3, rank=0, device="cpu")
    again.load(state)
    assert torch.equal(devices.randn(4, again.noise), ahead)
    other_rank = devices.TrainingStreams(seed=3, rank=1, device="cpu")
    assert not torch.equal(devices.rand(5, other_rank.data),
                           devices.rand(5, devices.TrainingStreams(3, 0, "cpu").data))
    other_rank.reseed(100)
    assert devices.stream_seed(3, 1) != devices.stream_seed(3, 0)


def test_pick_device_follows_the_stage_and_what_this_process_sees():
    assert devices.pick_device(False).type == "cpu"
    assert devices.pick_device(True).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"^--device='tpu': expected cpu, cuda"):
        devices.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="has no CUDA device"):
            devices.resolve_device("cuda")


def test_bf16_autocast_wraps_only_network_calls_on_a_gpu():
    from hdd_ray.ensemble import network_call

    assert isinstance(devices.autocast("cpu", "bf16"), type(devices.autocast("cpu", "no")))
    net = network_call(lambda x, t, cond: (x * 2).to(torch.bfloat16), "cpu", "bf16")
    x = torch.ones(2, 3, dtype=torch.float64)
    assert net(x, torch.zeros(2), None).dtype == torch.float64  # back in the input's dtype


def test_batch_size_is_global_and_splits_evenly_over_workers():
    from hdd_ray.training.loop import rank_batch_size

    assert [rank_batch_size(64, w) for w in (1, 2, 4)] == [64, 32, 16]
    with pytest.raises(ConfigError, match="must split evenly over resources.num_workers=3"):
        rank_batch_size(64, 3)
    with pytest.raises(ConfigError, match=r"^experts \(cluster 0\): train.batch_size=64 is the "
                                          r"global batch"):
        load_config(overrides=["experts.resources.num_workers=3"])
    load_config(overrides=["experts.resources.num_workers=4", "ray.executor=train"])  # 4 x 16
