"""The prepare stage end to end on real local Ray: demo corpus, damage, embedders, bad input.

One demo campaign is prepared once for the module and shared; every other run uses a small
corpus cut from the demo digits. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers_corpus import load_cluster_arrays

from hdd_ray.clustering import assign_clusters, heldout_mask
from hdd_ray.config import load_config
from hdd_ray.corpus import (
    DEMO_NUM_SAMPLES,
    decode_image,
    iter_samples,
    iter_tar,
    tar_bytes,
    write_demo_corpus,
    write_tar,
)
from hdd_ray.errors import PrepareError
from hdd_ray.prepare import build_embedder, prepare_corpus

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


def _cfg(root, *overrides):
    return load_config(None, [f"root={root}", *overrides])


def _webdataset_cfg(root, uri, *overrides):
    return _cfg(root, "corpus.source=webdataset", f"corpus.uri={uri}",
                "tracking.enabled=false", *overrides)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo digits as a list of sample dicts (key, png, txt, json bytes)."""
    d = tmp_path_factory.mktemp("digits")
    shards = write_demo_corpus(str(d))
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(shards)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    """The demo campaign (K = 8, pixels embedder), prepared once, tracked in MLflow."""
    root = tmp_path_factory.mktemp("demo")
    cfg = _cfg(root)
    return cfg, prepare_corpus(cfg)


def _written_samples(clusters_dir: Path) -> list[tuple[str, str, dict]]:
    """(folder, key, json) of every sample in every shard on disk (not from the manifest)."""
    out = []
    for folder in sorted(p for p in clusters_dir.iterdir() if p.is_dir() and p.name != "embeddings"):
        for shard in sorted(folder.glob("*.tar")):
            for s in iter_samples(str(shard)):
                out.append((folder.name, s["__key__"], json.loads(s["json"])))
    return out


# --------------------------------------------------------------------------- demo campaign


def test_demo_clusters_agree_with_digit_labels(demo):
    from sklearn.metrics import adjusted_rand_score

    cfg, manifest = demo
    rows = _written_samples(Path(cfg.root) / "clusters")
    labels = [meta["label"] for _, _, meta in rows]
    clusters = [meta["cluster"] for _, _, meta in rows]
    ari = adjusted_rand_score(labels, clusters)
    print(f"ARI(clusters, digit labels) = {ari:.3f}  (K = {manifest['k']}, chance ~ 0)")
    assert ari > 0.3
    assert ari == pytest.approx(manifest["ari_vs_labels"])


def test_every_sample_lands_in_exactly_one_cluster_or_heldout(demo):
    cfg, manifest = demo
    rows = _written_samples(Path(cfg.root) / "clusters")
    keys = [key for _, key, _ in rows]
    assert len(keys) == len(set(keys)) == DEMO_NUM_SAMPLES
    assert set(keys) == {f"digit-{i:06d}" for i in range(DEMO_NUM_SAMPLES)}
    train = [(f, m) for f, _, m in rows if f != "heldout"]
    assert all(int(f) == m["cluster"] for f, m in train)  # folder and json agree
    counts = np.bincount([m["cluster"] for _, m in train], minlength=8).tolist()
    held = np.bincount([m["cluster"] for f, _, m in rows if f == "heldout"], minlength=8)
    assert counts == manifest["counts"] and held.tolist() == manifest["heldout_counts"]
    assert sum(counts) + held.sum() == DEMO_NUM_SAMPLES == manifest["num_samples"]
    # stratified: each cluster gives round(10%) of its samples to the held-out split
    for c in range(8):
        assert held[c] == int(np.floor(0.1 * (counts[c] + held[c]) + 0.5))
    assert manifest["skipped"] == {"count": 0, "reasons": {}, "examples": []}


def test_shards_hold_their_cluster_in_a_shuffled_order(demo):
    """Not a run of neighbouring keys: the digits' keys follow the source's order, so a
    key-ordered shard would hold one stretch of the corpus (the stream mixes 16 shards)."""
    cfg, _ = demo
    rows = _written_samples(Path(cfg.root) / "clusters")
    for folder in {f for f, _, _ in rows}:
        keys = [k for f, k, _ in rows if f == folder]  # shard after shard, as written
        numbers = np.array([int(k.split("-")[1]) for k in keys])
        assert keys != sorted(keys), folder
        # spread: the first shard's keys cover the folder's whole key range, not its start
        first = numbers[: min(len(numbers), cfg.corpus.shard_size)]
        assert first.max() - first.min() > 0.8 * (numbers.max() - numbers.min()), folder


def test_cluster_shards_load_as_arrays(demo):
    cfg, manifest = demo
    images, captions = load_cluster_arrays(cfg.root, 3)
    assert images.shape == (manifest["counts"][3], 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.max() == 1.0
    assert len(captions) == len(images) and all("digit" in c or "number" in c or "handwritten"
                                                in c for c in captions)
    held, _ = load_cluster_arrays(cfg.root, "heldout")
    assert len(held) == manifest["num_heldout"]
    c0 = manifest["clusters"][0]
    assert c0["shards"] == ["0/shard-000000.tar"] and c0["count"] == manifest["counts"][0]


def test_prepare_run_is_tracked_in_mlflow(demo):
    import mlflow

    from hdd_ray.tracking import tracking_uri

    cfg, manifest = demo
    mlflow.set_tracking_uri(tracking_uri(cfg))
    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.info.run_name == "prepare" and run.data.tags["stage"] == "prepare"
    assert run.data.params["clustering.k"] == "8"
    for c in range(8):
        assert run.data.metrics[f"count_cluster_{c}"] == manifest["counts"][c]
    assert run.data.metrics["ari_vs_labels"] == pytest.approx(manifest["ari_vs_labels"])
    assert run.data.metrics["skipped"] == 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"clusters_montage.png", "manifest.json"} <= artifacts
    montage = decode_image((Path(cfg.root) / "clusters" / "montage.png").read_bytes())
    assert montage.size[1] >= 8 * 32  # one row per cluster


def test_rerun_reuses_and_force_recomputes_identically(demo, capsys):
    cfg, manifest = demo
    clusters = Path(cfg.root) / "clusters"
    files = sorted(clusters.glob("*/shard-*.tar")) + [clusters / "manifest.json"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}

    again = prepare_corpus(cfg)
    assert again["reused"] and again["fingerprint"] == manifest["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in files} == {p: m for p, (m, _) in before.items()}

    redone = prepare_corpus(cfg, force=True)
    assert not redone["reused"]
    for p, (mtime, data) in before.items():
        if p.name.endswith(".tar"):  # rewritten, byte for byte the same
            assert p.stat().st_mtime_ns != mtime and p.read_bytes() == data
    assert redone["counts"] == manifest["counts"] and redone["data_hash"] == manifest["data_hash"]


# --------------------------------------------------------------------------- damaged input


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, digits, ray_local):
    """300 digits in 3 shards: one PNG replaced by garbage, one shard cut mid-member."""
    d = tmp_path_factory.mktemp("damaged")
    corpus = d / "corpus"
    a, b, c = digits[:100], digits[100:200], digits[200:300]
    a = [dict(s) for s in a]
    a[17]["png"] = b"\x89PNG but not really an image"
    write_tar(str(corpus / "a.tar"), a)
    data = tar_bytes(b)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut_member = tar.getmember(f"{b[40]['__key__']}.png")
    (corpus / "b.tar").write_bytes(data[: cut_member.offset_data + 10])  # inside sample 40
    write_tar(str(corpus / "c.tar"), c)
    cfg = _webdataset_cfg(d / "run", corpus, "clustering.k=4", "clustering.balance_cap=80",
                          "corpus.shard_size=50")
    return cfg, prepare_corpus(cfg), {"garbage": a[17]["__key__"], "cut": b[40]["__key__"]}


def test_undecodable_image_is_skipped_and_counted(damaged):
    _, manifest, bad = damaged
    assert manifest["skipped"]["reasons"]["undecodable_image"] == 1
    assert {"key": bad["garbage"], "reason": "undecodable_image"} in [
        {k: e[k] for k in ("key", "reason")} for e in manifest["skipped"]["examples"]
    ]


def test_truncated_tar_is_skipped_counted_and_the_rest_processed(damaged):
    cfg, manifest, bad = damaged
    assert manifest["skipped"]["reasons"]["truncated_tar"] == 1
    assert manifest["skipped"]["count"] == 2
    # a: 99 good, b: the 40 samples before the cut, c: 100
    assert manifest["num_samples"] == 99 + 40 + 100
    rows = _written_samples(Path(cfg.root) / "clusters")
    keys = {key for _, key, _ in rows}
    assert len(rows) == len(keys) == 239 and bad["garbage"] not in keys and bad["cut"] not in keys
    per_cluster = np.array(manifest["counts"]) + np.array(manifest["heldout_counts"])
    assert per_cluster.max() <= 80  # clustering.balance_cap


def test_new_clustering_settings_reuse_the_embeddings(damaged, caplog):
    cfg, manifest, _ = damaged
    cfg = copy.deepcopy(cfg)
    cfg.clustering.k, cfg.clustering.balance_cap = 3, None
    with caplog.at_level(logging.INFO, logger="hdd_ray.prepare"):
        redone = prepare_corpus(cfg)
    assert "reusing embeddings" in caplog.text and not redone["reused"]
    assert redone["k"] == 3 and len(list((Path(cfg.root) / "clusters").glob("[3-9]"))) == 0
    assert redone["skipped"] == manifest["skipped"] and redone["num_samples"] == 239
    assert redone["fingerprint"] != manifest["fingerprint"]


def test_truncated_header_is_reported_not_silently_dropped(digits):
    data = tar_bytes(digits[:3])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmember(f"{digits[2]['__key__']}.txt")
    samples = list(iter_tar(io.BytesIO(data[: last.offset + 100]), "x.tar"))  # cut in a header
    assert [s["__key__"] for s in samples] == [d["__key__"] for d in digits[:3]]
    assert "__error__" not in samples[1] and samples[2]["__error__"] == "truncated_tar"
    assert list(iter_tar(io.BytesIO(b"not a tar" * 100), "y.tar"))[0]["__error__"] == (
        "unreadable_shard"
    )


# --------------------------------------------------------------------------- feature embedders


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("small")
    write_tar(str(d / "shard-000000.tar"), digits[:200])
    return d


def _stored_embedding(embeddings: Path, key: str) -> np.ndarray:
    import pyarrow.parquet as pq

    t = pq.read_table(embeddings).to_pandas()
    return np.asarray(t.loc[t["key"] == key, "embedding"].iloc[0], np.float32)


def _stored_keys(embeddings: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(embeddings, columns=["key"]).column("key").to_pylist())


def _embed(cfg, corpus: Path, work: Path, text=None) -> tuple[int, Path]:
    """Prepare's embedding pass alone (Ray Data, the embedder actors) over ``corpus``'s
    shards -> (dimension, the embeddings folder). Clustering, assignment and shard writing
    are the same for every embedder and tested on the demo campaign above."""
    from hdd_ray.prepare.passes import embed_pass

    shards = sorted(str(p) for p in corpus.glob("*.tar"))
    out = work / "embeddings"
    dim = embed_pass(cfg, shards, str(out), str(work / "embedded.marker"), "test", text=text)
    return dim, out


def test_dinov2_embedder_runs_from_a_local_weights_file(tmp_path, small_corpus, digits, ray_local):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28)
    weights = tmp_path / "dinov2_vits14.safetensors"
    save_file(model.state_dict(), str(weights))
    cfg = _webdataset_cfg(tmp_path / "run", small_corpus, "clustering.k=4",
                          "clustering.embedder=dinov2",
                          "clustering.embedder_arch=vit_small_patch14_dinov2",
                          f"clustering.embedder_weights={weights}",
                          "clustering.embedder_image_size=28")
    dim, embeddings = _embed(cfg, small_corpus, tmp_path)
    assert dim == 384 and len(_stored_keys(embeddings)) == 200
    # the stored features are those of the saved weights (random init would differ)
    emb = build_embedder("dinov2", 1, arch="vit_small_patch14_dinov2", weights=str(weights),
                         image_size=28)
    img = decode_image(digits[0]["png"])
    expected = emb.embed(emb.preprocess(img)[None])[0]
    np.testing.assert_allclose(_stored_embedding(embeddings, digits[0]["__key__"]),
                               expected, atol=1e-4)


def test_open_clip_embedder_and_frozen_text_tower_run_from_a_local_weights_file(
        tmp_path, small_corpus, digits, ray_local):
    """The embedder's image tower embeds; the experts' frozen text tower (the same CLIP file)
    runs once per caption in the same actors, and its stored features are its output at the
    caption's real tokens, in float16."""
    import open_clip
    import torch

    from hdd_ray.campaign import text_features_record
    from hdd_ray.config import to_dict
    from hdd_ray.models.text import TINY_OPEN_CLIP_CONFIG, OpenCLIPTextEncoder
    from hdd_ray.models.text_features import decode_features
    from hdd_ray.prepare.stage import fingerprint_of

    arch = tmp_path / "hdd-tiny-clip-test.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(str(arch))
    model = open_clip.create_model("hdd-tiny-clip-test", pretrained=None)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    tower = ["experts.text.encoder=open_clip", f"experts.text.arch={arch}",
             f"experts.text.pretrained={weights}"]
    cfg = _webdataset_cfg(tmp_path / "run", small_corpus, "clustering.k=4",
                          "clustering.embedder=open_clip", f"clustering.embedder_arch={arch}",
                          f"clustering.embedder_weights={weights}", *tower)
    record = text_features_record(to_dict(cfg.experts.text))
    dim, embeddings = _embed(cfg, small_corpus, tmp_path, text=record)
    assert dim == 32 and len(_stored_keys(embeddings)) == 200
    rows = pq.read_table(embeddings, columns=["key", "caption", "text"]).to_pylist()
    assert len(rows) == 200 and all(r["text"] for r in rows)
    text = OpenCLIPTextEncoder(str(arch), str(weights))
    for row in rows[:5]:
        stored = decode_features(row["text"], 64, 16)
        want = text.encode([row["caption"]])
        real = want["tokens"][0][want["mask"][0]].numpy()
        assert stored.dtype == np.float16 and stored.shape == real.shape
        np.testing.assert_allclose(stored.astype(np.float32), real, atol=2e-3, rtol=2e-3)
    # the tower is in prepare's fingerprint: another tower (or none) prepares again
    without = _webdataset_cfg(tmp_path / "run", small_corpus, "clustering.k=4",
                              "clustering.embedder=open_clip", f"clustering.embedder_arch={arch}",
                              f"clustering.embedder_weights={weights}")
    assert fingerprint_of(cfg) != fingerprint_of(without)
    emb = build_embedder("open_clip", 1, arch=str(arch), weights=str(weights))
    img = decode_image(digits[5]["png"])
    expected = emb.embed(emb.preprocess(img)[None])[0]
    np.testing.assert_allclose(_stored_embedding(embeddings, digits[5]["__key__"]),
                               expected, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def _one_line_error(cfg, match: str) -> str:
    with pytest.raises(PrepareError) as info:
        prepare_corpus(cfg)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_missing_path_is_one_line(tmp_path):
    # no ray_local: the check happens before Ray starts
    _one_line_error(_webdataset_cfg(tmp_path, tmp_path / "nope"),
                    f"corpus '{tmp_path / 'nope'}': no such file or directory")
    _one_line_error(_webdataset_cfg(tmp_path, tmp_path / "shard-{000..003}.tar"),
                    "no such file or directory")


def test_wrong_image_key_is_one_line(tmp_path, small_corpus):
    msg = _one_line_error(_webdataset_cfg(tmp_path, small_corpus, "corpus.image_key=jpg"),
                          "corpus.image_key='jpg': no such member in sample 'digit-000000'")
    assert "(it has: json, png, txt)" in msg
    _one_line_error(_webdataset_cfg(tmp_path, small_corpus, "corpus.caption_key=caption"),
                    "corpus.caption_key='caption'")


def test_missing_text_tower_weights_are_one_line_before_ray(tmp_path, small_corpus):
    """A frozen text tower's features are stored by prepare: its weights are checked first."""
    tower = ["experts.text.encoder=open_clip", "experts.text.arch=ViT-B-32"]
    _one_line_error(_webdataset_cfg(tmp_path, small_corpus, *tower,
                                    f"experts.text.pretrained={tmp_path}/text.pt"),
                    f"experts.text.pretrained='{tmp_path}/text.pt': no such file")
    _one_line_error(_webdataset_cfg(tmp_path, small_corpus, *tower,
                                    "experts.text.pretrained=no-such-tag"),
                    "experts.text.pretrained='no-such-tag': not a local file nor an open_clip tag")


def test_missing_embedder_weights_is_one_line(tmp_path, small_corpus):
    _one_line_error(_webdataset_cfg(tmp_path, small_corpus, "clustering.embedder=dinov2",
                                    "clustering.embedder_arch=vit_small_patch14_dinov2",
                                    f"clustering.embedder_weights={tmp_path}/w.pth"),
                    f"clustering.embedder_weights='{tmp_path}/w.pth': no such file")


def test_not_a_tar_is_one_line(tmp_path):
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    _one_line_error(_webdataset_cfg(tmp_path / "run", tmp_path / "junk.tar"),
                    "no readable sample in its first shards")


def test_more_clusters_than_samples_is_one_line(tmp_path, digits, ray_local):
    write_tar(str(tmp_path / "c" / "s.tar"), digits[:5])
    _one_line_error(_webdataset_cfg(tmp_path / "run", tmp_path / "c", "clustering.k=8"),
                    "clustering.k=8: more clusters than decodable samples (5)")


def test_corpus_of_only_garbage_is_one_line(tmp_path, digits, ray_local):
    garbage = [{**s, "png": b"garbage" * (i + 1)} for i, s in enumerate(digits[:6])]
    write_tar(str(tmp_path / "c" / "s.tar"), garbage)
    _one_line_error(_webdataset_cfg(tmp_path / "run", tmp_path / "c"),
                    "no decodable sample (6 skipped: undecodable_image=6)")


# --------------------------------------------------------------------------- pure functions


def test_balanced_assignment_caps_clusters_and_spills_to_next_nearest():
    # 5 samples all nearest to cluster 0; cap 2 -> the two closest stay, the rest move on.
    dists = np.array([[0.1, 1, 2], [0.2, 2, 1], [0.3, 1, 3], [0.4, 3, 1], [0.5, 1, 2]], float)
    cluster, distance = assign_clusters(dists, balance_cap=2)
    assert cluster.tolist() == [0, 0, 1, 2, 1]
    assert distance.tolist() == [0.1, 0.2, 1, 1, 1]
    assert assign_clusters(dists)[0].tolist() == [0] * 5
    with pytest.raises(PrepareError, match="hold at most 3 samples, the corpus has 5"):
        assign_clusters(dists, balance_cap=1)


def test_heldout_split_is_stratified_and_order_free():
    keys = [f"k{i:04d}" for i in range(300)]
    cluster = np.repeat([0, 1, 2, 3], [200, 95, 4, 1])
    mask = heldout_mask(keys, cluster, 0.1, seed=0)
    assert [int(mask[cluster == c].sum()) for c in range(4)] == [20, 10, 0, 0]
    assert heldout_mask(keys, cluster, 0.5, seed=0)[cluster == 3].sum() == 0  # keeps one
    perm = np.random.default_rng(0).permutation(300)
    shuffled = heldout_mask([keys[i] for i in perm], cluster[perm], 0.1, seed=0)
    assert (shuffled == mask[perm]).all()
    assert (heldout_mask(keys, cluster, 0.1, seed=1) != mask).any()


# --------------------------------------------------------------------------- the job


def _job(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_corpus.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def _job_main():
    """``jobs/prepare_corpus.py``'s ``main(argv)``, to run the job in this process."""
    import importlib

    return importlib.import_module("jobs.prepare_corpus").main


def test_job_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job_main()(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("corpus.image_key", "clustering.k", "clustering.embedder_weights",
                   "clustering.balance_cap", "--force", "ray job submit"):
        assert option in out


@pytest.mark.parametrize("args, message", [
    (["clustering.k=abc"], "error: clustering.k"),
    (["clustering.nope=1"], "error: clustering.nope: unknown key"),
])
def test_job_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:  # in process: the config is refused while parsing
        _job_main()([f"root={tmp_path}", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "clusters").exists()


def test_job_refuses_a_missing_corpus_in_one_line_before_ray(tmp_path):
    """The job as a process, as a user runs it: exit status 2, one line, no Ray started."""
    out = _job(f"root={tmp_path}", "corpus.source=webdataset", "corpus.uri=/no/such/corpus")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: corpus '/no/such/corpus': no such file or directory"), out.stderr
    assert not (tmp_path / "clusters").exists()
