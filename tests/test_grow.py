"""Growing a finished campaign (issue 28): ``jobs/add_expert.py`` adds a cluster from new
shards, trains its expert and the incremental router; the mixtures of the cluster set before
still load with their ids and give the same images; conflicts are refused in one line before
Ray starts; the manifest's generations; the training-free centroid router's math."""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hdd_ray.config import load_config

pytestmark = pytest.mark.ray

#: tiny runs: Ray tasks (no Ray Train), a few steps of small batches
FAST = ["experts.train.steps=5", "experts.train.batch_size=16", "router.train.steps=5",
        "router.train.batch_size=16", "router.grow.steps=5", "router.grow.replay_samples=64",
        "ray.executor=task", "evaluation.enabled=false", "tracking.enabled=false",
        "experts.resources.cpus_per_worker=0.5", "router.resources.cpus_per_worker=0.5",
        "ray.max_concurrent_experts=0"]
PROMPTS = ["a handwritten digit seven", "the digit 2", "a sideways digit", "a scan of a 0"]


def _new_shard(path: Path, count: int = 40, first: int = 0) -> Path:
    """Digits the campaign has never seen: transposed scans under new keys and captions."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from hdd_ray.corpus import write_tar

    digits = load_digits()
    samples = []
    for i in range(first, first + count):
        buf = io.BytesIO()
        Image.fromarray((digits.images[i].T * 15.9).astype(np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"sideways-{i:05d}", "png": buf.getvalue(),
                        "txt": f"a sideways digit {digits.target[i]}".encode(),
                        "json": json.dumps({"label": int(digits.target[i])}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(str(path), samples)
    return path


def _job():
    return importlib.import_module("jobs.add_expert")


def test_add_expert_grows_a_finished_campaign(prepared_campaign, tmp_path, capsys):
    from hdd_ray.campaign import expert_id, load_manifest, router_id
    from hdd_ray.config import resolve_experts
    from hdd_ray.ensemble import load_mixture
    from hdd_ray.training.launcher import train_campaign

    root = prepared_campaign.copy(tmp_path)
    over = [f"root={root}", *prepared_campaign.overrides, *FAST]
    cfg3 = load_config(overrides=over)
    assert all(s.ok for s in train_campaign(cfg3, assignments=[[0]]))
    manifest3 = load_manifest(cfg3)
    ids3 = ([expert_id(cfg3, e, manifest3) for e in resolve_experts(cfg3)],
            router_id(cfg3, manifest3))
    before = load_mixture(cfg3).sample(PROMPTS, seed=3, steps=2)

    new = _new_shard(tmp_path / "new" / "shard-000000.tar")
    assert _job().main(["--shards", str(new.parent), *over]) == 0
    out = capsys.readouterr().out
    assert "clustering.k=4 experts.ddpm_clusters=[0]" in out

    raw = json.loads((root / "clusters" / "manifest.json").read_text())
    assert [g["k"] for g in raw["generations"]] == [3, 4] and raw["k"] == 4
    assert raw["clusters"][3]["count"] + raw["clusters"][3]["heldout"] == 40
    assert len(raw["generations"][1]["heldout"]["shards"]) == \
        len(raw["generations"][0]["heldout"]["shards"]) + 1
    assert np.load(root / "clusters" / "centroids.npy").shape[0] == 4

    # the 4-expert mixture samples; its router grew from the 3-cluster one
    cfg4 = load_config(overrides=[*over, "clustering.k=4"])
    manifest4 = load_manifest(cfg4)
    mixture4 = load_mixture(cfg4)
    assert len(mixture4.experts) == 4 and mixture4.router.net.num_experts == 4
    images = mixture4.sample(PROMPTS, seed=3, steps=2)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    router4 = json.loads((root / "router" / router_id(cfg4, manifest4) / "router.json")
                         .read_text())
    assert router4["init"]["grown_from"] == ids3[1] and router4["steps"] == 5

    # the 3-expert mixture: the same ids, the same images
    manifest3 = load_manifest(cfg3)
    assert ([expert_id(cfg3, e, manifest3) for e in resolve_experts(cfg3)],
            router_id(cfg3, manifest3)) == ids3
    assert torch.equal(load_mixture(cfg3).sample(PROMPTS, seed=3, steps=2), before)
    # a prepare of either set reuses the grown corpus
    from hdd_ray.prepare import prepare_corpus

    assert prepare_corpus(cfg4)["reused"] and prepare_corpus(cfg3)["reused"]
