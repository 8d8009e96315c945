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


# ------------------------------------------------------------------ conflicts: one line, no Ray


@pytest.fixture
def copied(prepared_campaign, tmp_path):
    """A private copy of the prepared (untrained) K = 3 campaign and its job overrides."""
    root = prepared_campaign.copy(tmp_path)
    return root, [f"root={root}", *prepared_campaign.overrides, *FAST]


def _refused(capsys, argv: list[str]) -> str:
    assert _job().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_new_data_overlapping_a_cluster_is_refused(copied, capsys, tmp_path):
    from hdd_ray.corpus import iter_samples, write_tar

    root, over = copied
    own = sorted((root / "clusters" / "1").glob("*.tar"))[0]
    assert "overlaps cluster 1" in _refused(capsys, ["--shards", str(own), *over])
    assert "same key" in _refused(capsys, ["--shards", str(own), *over])
    # the same content under new keys
    renamed = [{**{k: v for k, v in s.items() if k != "__url__"}, "__key__": "x" + s["__key__"]}
               for s in iter_samples(str(own))]
    write_tar(str(tmp_path / "renamed.tar"), renamed)
    err = _refused(capsys, ["--shards", str(tmp_path / "renamed.tar"), *over])
    assert "overlaps cluster 1" in err and "same content" in err
    # a campaign grows from its newest cluster set only
    new = _new_shard(tmp_path / "new.tar", count=4)
    assert "has k=3" in _refused(capsys, ["--shards", str(new), *over,
                                                         "clustering.k=4"])


def _fake_expert(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True)
    (directory / "weights.safetensors").write_bytes(b"not read before the checks")
    desc = {"identity": {}, "steps": 1, "objective": "fm_velocity", "expert_id": "c0-fm-x",
            "image_size": 8, "channels": 1, **fields}
    (directory / "expert.json").write_text(json.dumps(desc))
    return directory


def test_a_contributed_expert_of_another_resolution_or_latent_space_is_refused(
        copied, capsys, tmp_path):
    root, over = copied
    new = _new_shard(tmp_path / "new.tar", count=4)
    other = _fake_expert(tmp_path / "big", image_size=16)
    err = _refused(capsys, ["--shards", str(new), "--expert-dir", str(other), *over])
    assert "trained at 16x16" in err and "8x8" in err
    latent = _fake_expert(tmp_path / "latent", latents={
        "vae": "/somewhere/vae", "identity": "sha256:abc", "shape": [4, 8, 8],
        "scaling_factor": 0.18, "shift_factor": 0.0, "dtype": "float16"})
    err = _refused(capsys, ["--shards", str(new), "--expert-dir", str(latent), *over])
    assert "was trained against" in err and "refused" in err
    # a description without what the checks read: one line, not a traceback
    vague = _fake_expert(tmp_path / "vague", objective="velocity", image_size=None)
    err = _refused(capsys, ["--shards", str(new), "--expert-dir", str(vague), *over])
    assert "lacks a valid image_size, objective" in err


def test_a_router_of_another_cluster_set_is_refused():
    from hdd_ray.campaign.loading import check_router_clusters
    from hdd_ray.ensemble import Mixture
    from hdd_ray.errors import CampaignError, MixtureError
    from hdd_ray.models.expert import RouterModel

    manifest = {"k": 2, "data_hash": "d2", "clusters": [{"hash": "a"}, {"hash": "b"}]}
    check_router_clusters({"k": 2, "data_hash": "d2", "clusters": ["a", "b"]}, manifest, "r")
    check_router_clusters({"k": 2, "data_hash": "d2"}, manifest, "r")  # an older router.json
    for desc in ({"k": 3, "data_hash": "d3", "clusters": ["a", "b", "c"]},
                 {"k": 2, "data_hash": "d2", "clusters": ["a", "c"]}):
        with pytest.raises(CampaignError, match="another cluster set"):
            check_router_clusters(desc, manifest, "router r")
    router = RouterModel("router-T", 8, 1, 3)
    with pytest.raises(MixtureError, match="3 outputs but the mixture 2 experts"):
        Mixture([(None, {}), (None, {})], router, load_config(), retired=[0, 1])


# ------------------------------------------------------------------ generations, centroid router


def test_an_old_manifest_is_one_generation_and_a_grown_one_keeps_its_sets():
    from hdd_ray.campaign import generation_view, generations, grown_data_hash, parent_view

    old = {"k": 2, "data_hash": "h", "heldout": {"count": 2, "shards": ["heldout/s0.tar"]},
           "clusters": [{"cluster": c, "count": 5, "heldout": 1, "hash": f"c{c}",
                         "shards": [f"{c}/s.tar"]} for c in range(2)]}
    assert generation_view(old, 2) is old and generation_view(old, 3) is None
    assert generations(old) == [{"k": 2, "data_hash": "h", "clusters": ["c0", "c1"],
                                 "heldout": old["heldout"]}]
    new = {"cluster": 2, "count": 3, "heldout": 1, "hash": "c2", "shards": ["2/s.tar"]}
    grown_heldout = {"count": 3, "shards": ["heldout/s0.tar", "heldout/c2-s.tar"]}
    grown = {**old, "k": 3, "clusters": [*old["clusters"], new], "heldout": grown_heldout,
             "data_hash": grown_data_hash("h", "c2"),
             "generations": [*generations(old), {"k": 3, "data_hash": grown_data_hash("h", "c2"),
                                                 "clusters": ["c0", "c1", "c2"],
                                                 "heldout": grown_heldout}]}
    two, three = generation_view(grown, 2), generation_view(grown, 3)
    assert two["k"] == 2 and two["data_hash"] == "h" and two["heldout"] == old["heldout"]
    assert [c["hash"] for c in two["clusters"]] == ["c0", "c1"] and two["num_train"] == 10
    assert three["counts"] == [5, 5, 3] and three["num_heldout"] == 3
    assert parent_view(three)["data_hash"] == "h" and parent_view(two) is None
    assert grown_data_hash("h", "c2") != grown_data_hash("h", "c3")


def test_centroid_weights_are_a_softmax_of_negative_squared_distances():
    from hdd_ray.routing import CentroidRouter, centroid_weights

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    w = centroid_weights(text, centroids, temperature=0.5)
    d2 = ((text[:, None] - centroids[None]) ** 2).sum(-1)
    expected = torch.exp(-d2 / 0.5) / torch.exp(-d2 / 0.5).sum(1, keepdim=True)
    torch.testing.assert_close(w, expected)
    assert w.argmax(1).tolist() == [0, 1, 1]
    # a low temperature picks the nearest centroid, a high one tends to uniform
    assert torch.allclose(centroid_weights(text, centroids, 1e-3)[0], torch.tensor([1., 0, 0]))
    assert torch.allclose(centroid_weights(text, centroids, 1e4), torch.full((3, 3), 1 / 3),
                          atol=1e-3)
    # adding an expert is adding a centroid: the others keep their ratios
    more = centroid_weights(text, torch.cat([centroids, torch.tensor([[0.0, -1.0]])]), 0.5)
    torch.testing.assert_close(more[:, :3] / more[:, :3].sum(1, keepdim=True), w)
    router = CentroidRouter(lambda prompts: text[: len(prompts)], centroids, 0.5)
    assert router.num_experts == 3 and torch.equal(router.weights(["a", "b"]), w[:2])
    with pytest.raises(ValueError, match="temperature"):
        centroid_weights(text, centroids, 0.0)


def test_the_centroid_router_refuses_clusters_without_a_clip_image_tower(tmp_path):
    from hdd_ray.errors import MixtureError
    from hdd_ray.routing import load_centroid_router

    cfg = load_config(overrides=[f"root={tmp_path}", "sampling.router=centroid"])
    with pytest.raises(MixtureError, match="needs clusters embedded by a CLIP image tower"):
        load_centroid_router(cfg, {"k": 2, "embedder": {"name": "pixels"}})
