"""The training loop itself, in a plain process (no Ray): resume is exact, the objective is the
objective's business, and the loop reports what the launcher relies on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from hdd_ray.config import load_config, resolve_experts
from hdd_ray.corpus import write_tar
from hdd_ray.training.loop import LocalHooks, run_loop


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    digits = load_digits()
    samples = []
    for i in np.nonzero(digits.target == 3)[0][:64]:
        buf = io.BytesIO()
        Image.fromarray((digits.images[i] * 15.9).astype(np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"d{i:05d}", "png": buf.getvalue(),
                        "txt": b"a handwritten digit three",
                        "json": json.dumps({"cluster": 0}).encode()})
    path = tmp_path_factory.mktemp("shards") / "shard-000000.tar"
    write_tar(str(path), samples)
    return str(path)


def _config(shard: str, objective: str, steps: int) -> dict:
    cfg = load_config(overrides=[f"experts.objective={objective}", "experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    from dataclasses import asdict

    train = dict(expert.train, steps=steps, checkpoint_every=10, batch_size=16)
    return {"kind": "expert", "expert": asdict(expert), "train": train, "image_size": 8,
            "channels": 1, "shards": [shard], "torch_threads": 1}


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
