"""Hardening (issue 17, items 1-5): names that cannot destroy, caches that cannot go stale,
MLflow outages and corrupt artifacts that lose nothing, two launchers that cannot collide.

Each test provokes its failure for real: a real ``--force`` job run, real tar shards rewritten
with ``cp -p``, a real ``mlflow server`` on 127.0.0.1 stopped mid-campaign, truncated files,
two launchers on one root (real local Ray, the session instance), a hanging HTTP server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_training import copy_root

from hdd_ray import storage, tracking
from hdd_ray.campaign import (
    EXPERT_JSON,
    WEIGHTS,
    CampaignPaths,
    existing_state,
    expert_id,
    file_sha256,
    load_manifest,
    router_id,
)
from hdd_ray.config import ConfigError, load_config, resolve_experts
from hdd_ray.errors import CampaignError, ExpertRejected
from hdd_ray.lease import RunLock

ROOT = Path(__file__).resolve().parent.parent


def _job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------ destructive names


def test_force_with_a_dot_dot_sweep_name_is_refused_and_the_root_survives(tmp_path):
    root = tmp_path / "camp"
    (root / "experts" / "c0-fm-x").mkdir(parents=True)
    (root / "experts" / "c0-fm-x" / EXPERT_JSON).write_text("{}")
    (root / "sweeps" / "kept").mkdir(parents=True)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for name in ("..",):  # the other bad names: test_names_that_become_paths_...
        done = _job("jobs/sweep_objectives.py", f"root={root}", f"sweep.name={name}", "--force")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: sweep.name={name!r}: must be a single safe name")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.parametrize("key", ["name", "tracking.experiment", "sweep.name"])
def test_names_that_become_paths_are_single_safe_segments(key):
    for bad in ("..", ".hidden", "a/b", "a\\b", "x'y", 'x"y', "tab\there", ""):
        with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}="):
            load_config(overrides=[f"{key}={bad}"] if bad else [f"{key}=''"])
    load_config(overrides=[f"{key}=ok_name-1.2"])


def test_a_quote_in_a_tag_value_does_not_break_the_mlflow_filter(tmp_path):
    cfg = load_config(overrides=[f"root={tmp_path}"])
    exp = tracking.connect(cfg)
    tags = {"run_key": "it's a key"}
    first = exp.find_or_create("r", tags, key=("run_key",))
    again = exp.find_or_create("r", tags, key=("run_key",))
    assert first.run_id == again.run_id
    assert tracking.filter_literal('say "hi"') == "'say \"hi\"'"


# ------------------------------------------------------------------------ stale caches


def _manifest(k: int = 2) -> dict:
    return {"k": k, "data_hash": "d0", "clusters": [
        {"cluster": c, "count": 4, "hash": f"h{c}", "shards": []} for c in range(k)]}


def test_mixture_id_follows_the_router_the_extractor_and_the_clip_model(tmp_path):
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import mixture_id

    manifest = _manifest()
    base = load_config(overrides=[f"root={tmp_path}", "clustering.k=2", "experts.ddpm_clusters=[0]"])
    spec = MixtureSpec.from_config(base)

    def mid(*overrides: str, device_type: str = "cpu") -> str:
        cfg = load_config(overrides=[f"root={tmp_path}", "clustering.k=2", "experts.ddpm_clusters=[0]", *overrides])
        ids = [expert_id(cfg, e, manifest) for e in resolve_experts(cfg)]
        return mixture_id(cfg, spec, ids, router=router_id(cfg, manifest),
                          device_type=device_type)

    weights = tmp_path / "extractor.safetensors"
    weights.write_bytes(b"first weights")
    reference = mid()
    assert mid() == reference
    assert mid("router.train.steps=123") != reference  # a retrained router
    assert mid("evaluation.extractor_arch=vit_small_patch14_dinov2") != reference
    with_file = mid(f"evaluation.extractor_weights={weights}")
    assert with_file != reference
    stat = weights.stat()
    weights.write_bytes(b"other weights")  # same name, same size, same mtime, new content
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mid(f"evaluation.extractor_weights={weights}") != with_file
    assert mid("evaluation.clip_arch=ViT-B-32") != reference
    assert mid(device_type="cuda") != reference  # bf16 sampling applies on a GPU only
    assert mid("sampling.mixed_precision='no'", device_type="cuda") == mid(
        "sampling.mixed_precision='no'")


def test_expert_identity_is_world_size_invariant_and_counts_applied_precision(tmp_path):
    """``train.batch_size`` is global, so the world size is not part of an expert's id (the
    documented invariance); bf16 counts only where it applies (GPUs)."""
    from hdd_ray.training.loop import rank_batch_size

    manifest = _manifest()

    def eid(*overrides: str) -> str:
        cfg = load_config(overrides=[f"root={tmp_path}", "clustering.k=2", "experts.ddpm_clusters=[0]",
                                     "experts.train.batch_size=64", "ray.executor=train",
                                     *overrides])
        return expert_id(cfg, resolve_experts(cfg)[0], manifest)

    one = eid()
    assert eid("experts.resources.num_workers=4") == one
    assert eid("experts.resources.num_workers=2", "experts.resources.cpus_per_worker=3") == one
    for world in (1, 2, 4, 8):  # every world size sees the same global batch per micro-step
        assert rank_batch_size(64, world) * world == 64
    with pytest.raises(ConfigError, match="must split evenly"):
        load_config(overrides=["experts.train.batch_size=64", "experts.resources.num_workers=3"])
    gpu = eid("experts.resources.gpus_per_worker=1")
    assert gpu != one  # bf16 autocast really runs there
    assert eid("experts.resources.gpus_per_worker=1", "experts.resources.num_workers=4") == gpu
    # mixed_precision='no' on a GPU trains in fp32: not the bf16 id
    assert eid("experts.resources.gpus_per_worker=1", "experts.train.mixed_precision='no'") != gpu


def test_expert_id_hashes_local_pretrained_text_weights_by_content(tmp_path):
    manifest = _manifest()
    weights = tmp_path / "text.pt"
    weights.write_bytes(b"A" * 64)

    def eid() -> str:
        cfg = load_config(overrides=[f"root={tmp_path}", "clustering.k=2", "experts.ddpm_clusters=[0]",
                                     "experts.text.encoder=open_clip",
                                     "experts.text.arch=ViT-B-32",
                                     f"experts.text.pretrained={weights}"])
        return expert_id(cfg, resolve_experts(cfg)[0], manifest)

    first = eid()
    stat = weights.stat()
    weights.write_bytes(b"B" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert eid() != first
    moved = tmp_path / "moved.pt"
    shutil.copy2(weights, moved)
    second = eid()
    weights = moved
    assert eid() == second  # content, not the path


def test_a_frozen_text_tower_is_refused_on_a_corpus_without_its_stored_features(tmp_path):
    """Stored text features are never mixed: an expert whose frozen tower is not the one the
    corpus's features came from is refused in one line before any run starts; the same tower
    trains from them; a learned encoder ignores them."""
    from hdd_ray.campaign import text_features_record
    from hdd_ray.prepare.passes import _write_shard_group
    from hdd_ray.training.jobs import expert_job

    weights = tmp_path / "text.pt"
    weights.write_bytes(b"A" * 64)
    tower = ["experts.text.encoder=open_clip", "experts.text.arch=ViT-B-32",
             f"experts.text.pretrained={weights}"]
    cfg = load_config(overrides=[f"root={tmp_path}", "clustering.k=2",
                                 "experts.ddpm_clusters=[0]", *tower])
    expert = resolve_experts(cfg)[0]
    with pytest.raises(CampaignError, match="prepared without stored text features: run") as e:
        expert_job(cfg, expert, _manifest())
    assert "\n" not in str(e.value)
    record = text_features_record(expert.text)
    assert record["width"] == 512 and record["context_length"] == 77
    other = {**record, "identity": "another tower", "arch": "ViT-L-14"}
    with pytest.raises(CampaignError, match="prepared by the text tower ViT-L-14"):
        expert_job(cfg, expert, {**_manifest(), "text_features": other})
    from hdd_ray.errors import PrepareError
    from hdd_ray.prepare.grow import campaign_text_features

    with pytest.raises(PrepareError, match="prepared with no stored text features"):
        campaign_text_features(cfg, _manifest())  # add_expert's check, before Ray starts
    assert campaign_text_features(cfg, {**_manifest(), "text_features": record}) == record
    job = expert_job(cfg, expert, {**_manifest(), "text_features": record})
    assert job.settings.text_features == record
    assert job.identity["text_features"] == "float16"
    learned = load_config(overrides=[f"root={tmp_path}", "clustering.k=2",
                                     "experts.ddpm_clusters=[0]"])
    job = expert_job(learned, resolve_experts(learned)[0], {**_manifest(), "text_features": record})
    assert job.settings.text_features is None and "text_features" not in job.identity
    # prepare's write pass puts the features beside the sample
    from hdd_ray.corpus import iter_samples
    from hdd_ray.models.text_features import TEXT_MEMBER, encode_features

    feats = encode_features(torch.ones(3, 512).numpy())
    batch = {"dest": ["0"], "shard": [0], "pos": [0], "key": ["k0"], "caption": ["a cat"],
             "meta": ["{}"], "cluster": [0], "png": [b"not read here"], "text": [feats]}
    out = _write_shard_group(batch, str(tmp_path / "clusters"), text=True)
    assert out["text_bytes"] == [len(feats)]
    (sample,) = iter_samples(str(tmp_path / "clusters" / "0" / "shard-000000.tar"))
    assert sample[TEXT_MEMBER] == feats and sample["txt"] == b"a cat"


def test_corpus_rewritten_with_cp_p_is_prepared_again(tmp_path):
    from hdd_ray.corpus import write_demo_corpus
    from hdd_ray.prepare.stage import _inputs, _reusable_manifest

    shards = write_demo_corpus(str(tmp_path / "corpus"), shard_size=200)
    cfg = load_config(overrides=[f"root={tmp_path / 'root'}", "corpus.source=webdataset",
                                 f"corpus.uri={tmp_path / 'corpus'}"])
    paths = CampaignPaths(str(tmp_path / "root"))
    before = _inputs(cfg, paths).fingerprint
    assert _inputs(cfg, paths).fingerprint == before  # stable
    storage.write_json(paths.manifest, {"fingerprint": before, "clusters": []})
    assert _reusable_manifest(paths, before) is not None

    target = Path(shards[0])
    data = bytearray(target.read_bytes())
    i = data.index(b".txt") + 600  # inside the first samples' payload
    data[i:i + 4] = bytes(b ^ 0x55 for b in data[i:i + 4])
    new = tmp_path / "new.tar"
    new.write_bytes(bytes(data))
    stat = target.stat()
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    subprocess.run(["cp", "-p", str(new), str(target)], check=True)  # same size and mtime
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    after = _inputs(cfg, paths).fingerprint
    assert after != before
    assert _reusable_manifest(paths, after) is None  # re-prepared, not reused


def test_a_corrupt_manifest_is_one_line_everywhere(tmp_path):
    from hdd_ray.prepare.stage import _reusable_manifest

    root = tmp_path / "root"
    cfg = load_config(overrides=[f"root={root}"])
    paths = CampaignPaths(str(root))
    os.makedirs(paths.clusters)
    for garbage in (b'{"k": 2, "clus', b"\xff\xfe", b"[1, 2]", b'{"k": "x", "clusters": []}',
                    b'{"k": 2, "clusters": [], "generations": [{"kk": 2}]}',
                    b'{"k": 2, "clusters": [], "generations": "ab"}'):
        Path(paths.manifest).write_bytes(garbage)
        with pytest.raises(CampaignError) as info:
            load_manifest(cfg)
        assert "is corrupt" in str(info.value) and "\n" not in str(info.value)
        assert _reusable_manifest(paths, "any") is None  # prepare: prepares again
    Path(paths.manifest).write_bytes(b'{"k": 2, "clus')
    done = _job("jobs/train_expert.py", "--expert", "0", f"root={root}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "is corrupt" in lines[0], done.stderr


# ------------------------------------------------------------------------ corrupt artifacts


def _finished_dir(d: Path, identity: dict, own: bool) -> Path:
    import torch

    from hdd_ray.models.expert import save_weights

    d.mkdir(parents=True)
    save_weights(str(d / WEIGHTS), {"w": torch.arange(64, dtype=torch.float32)})
    storage.write_json(str(d / EXPERT_JSON), {"identity": identity, "steps": 10,
                                              "weights_sha256": file_sha256(str(d / WEIGHTS))})
    if own:
        (d / "checkpoint_2025-01-01_00-00-00.000000").mkdir()
    return d


def test_damaged_own_runs_are_trained_again_and_contributed_ones_rejected(tmp_path):
    ident = {"cluster": 0}
    cases = {
        "truncated weights": lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:40]),
        "two bytes of weights": lambda d: (d / WEIGHTS).write_bytes(b"xx"),
        "same-size weights": lambda d: (d / WEIGHTS).write_bytes(
            (d / WEIGHTS).read_bytes()[:-4] + b"\0\0\0\1"),
        "truncated json": lambda d: (d / EXPERT_JSON).write_text(
            (d / EXPERT_JSON).read_text()[:20]),
        "json without steps": lambda d: (d / EXPERT_JSON).write_text(
            json.dumps({"identity": ident})),
    }
    for i, (what, damage) in enumerate(cases.items()):
        own = _finished_dir(tmp_path / f"own{i}", ident, own=True)
        assert existing_state(str(own), ident, EXPERT_JSON) == ("finished", "")
        damage(own)
        state, why = existing_state(str(own), ident, EXPERT_JSON)
        assert state == "corrupt" and "\n" not in why and "training again" in why, what
        contributed = _finished_dir(tmp_path / f"contrib{i}", ident, own=False)
        damage(contributed)
        with pytest.raises(ExpertRejected, match="rejected") as info:
            existing_state(str(contributed), ident, EXPERT_JSON)
        assert "\n" not in str(info.value)
    # an older export without a checksum is checked structurally
    old = _finished_dir(tmp_path / "old", ident, own=False)
    desc = json.loads((old / EXPERT_JSON).read_text())
    del desc["weights_sha256"]
    (old / EXPERT_JSON).write_text(json.dumps(desc))
    assert existing_state(str(old), ident, EXPERT_JSON)[0] == "finished"
    (old / WEIGHTS).write_bytes((old / WEIGHTS).read_bytes()[:-1])
    with pytest.raises(ExpertRejected, match="truncated"):
        existing_state(str(old), ident, EXPERT_JSON)


def test_an_identity_that_is_not_an_object_is_corrupt_not_a_crash(tmp_path):
    from hdd_ray.campaign import read_description

    ident = {"cluster": 0}
    for i, bad in enumerate(["abc", [1, 2], 7]):
        own = _finished_dir(tmp_path / f"own{i}", ident, own=True)
        desc = json.loads((own / EXPERT_JSON).read_text())
        (own / EXPERT_JSON).write_text(json.dumps({**desc, "identity": bad}))
        assert read_description(str(own / EXPERT_JSON))[0] is None
        state, why = existing_state(str(own), ident, EXPERT_JSON)
        assert state == "corrupt" and "identity of type" in why and "\n" not in why
        contributed = _finished_dir(tmp_path / f"contrib{i}", ident, own=False)
        (contributed / EXPERT_JSON).write_text(json.dumps({**desc, "identity": bad}))
        with pytest.raises(ExpertRejected, match="identity of type"):
            existing_state(str(contributed), ident, EXPERT_JSON)


def test_weights_are_hashed_once_per_version_then_trusted_from_the_record(tmp_path,
                                                                          monkeypatch):
    import hdd_ray.campaign.artifacts as campaign
    from hdd_ray.campaign import VERIFIED_FILE, weights_problem
    from hdd_ray.errors import WeightsMismatch
    from hdd_ray.models.expert import load_weights

    calls: list[str] = []
    real = campaign.file_sha256
    monkeypatch.setattr(campaign, "file_sha256", lambda p: calls.append(p) or real(p))
    d = _finished_dir(tmp_path / "e", {"cluster": 0}, own=False)
    desc = json.loads((d / EXPERT_JSON).read_text())
    # just written (within SETTLED_NS): hashed every time, nothing recorded
    assert weights_problem(str(d), desc) == "" and weights_problem(str(d), desc) == ""
    assert len(calls) == 2 and not (d / VERIFIED_FILE).exists()
    monkeypatch.setattr(campaign, "SETTLED_NS", 0)  # as if it had been written long ago
    assert weights_problem(str(d), desc) == ""
    record = json.loads((d / VERIFIED_FILE).read_text())
    assert record["sha256"] == desc["weights_sha256"] and record["signature"]["size"] > 0
    assert weights_problem(str(d), desc) == "" and len(calls) == 3  # in-process cache
    campaign._VERIFIED.clear()  # another launch: the record, no read of the weights
    assert weights_problem(str(d), desc) == "" and len(calls) == 3
    # replaced in place, same size: the signature changed, so it is hashed again
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:-4] + b"\0\0\0\1")
    assert "checksum mismatch" in weights_problem(str(d), desc) and len(calls) == 4
    # loading always checks the bytes it reads (load_expert passes expert.json's sha256)
    import torch

    with pytest.raises(WeightsMismatch, match="checksum mismatch"):
        load_weights(torch.nn.Module(), str(d / WEIGHTS), "expert e",
                     sha256=desc["weights_sha256"])


def test_file_uri_roots_stay_where_they_point(tmp_path, monkeypatch):
    """``file:///abs`` roots (parse_job_args keeps them): the lock, the sqlite store and the
    MLflow artifacts land under /abs, never under ``./file:`` of the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"
    uri = root.as_uri()
    assert uri.startswith("file:///")
    lock = RunLock(uri + "/experts/e")
    assert lock.try_acquire() and "pid" in lock.holder()
    lock.release()
    assert (root / "experts" / "e" / ".writer.lock").is_file()
    cfg = load_config(overrides=[f"root={uri}"])
    assert tracking.artifact_location(cfg) == (root / "mlartifacts").as_uri()
    assert tracking.tracking_uri(cfg) == f"sqlite:///{root / 'mlflow.db'}"
    assert CampaignPaths(uri).local() == str(root)
    assert os.listdir(cwd) == []  # nothing under ./file:


def test_a_launch_that_found_mlflow_down_does_not_connect_again_to_sync(tmp_path, monkeypatch,
                                                                        caplog):
    from hdd_ray.tracking import RunTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(overrides=[f"root={tmp_path / 'root'}",
                                 f"tracking.uri=http://127.0.0.1:{port}"])
    tracking.Outbox(cfg.root).put({"run_key": "e", "metrics": []})
    mlf = RunTracker(cfg, None)
    assert mlf.exp is None
    calls: list[int] = []
    for where in (tracking.runs, tracking.delivery):  # every module that could reconnect
        monkeypatch.setattr(where, "connect", lambda c: calls.append(1))
    with caplog.at_level("WARNING"):
        mlf.sync()
    assert calls == []  # no second connection attempt
    assert "0 records delivered, 1 left" in caplog.text


def test_a_reused_run_reports_the_skipped_samples_of_its_training(tmp_path):
    from types import SimpleNamespace

    from hdd_ray.progress import RunStatus
    from hdd_ray.training.launcher import _reuse

    d = _finished_dir(tmp_path / "e", {"cluster": 0}, own=False)
    desc = json.loads((d / EXPERT_JSON).read_text())
    (d / EXPERT_JSON).write_text(json.dumps({**desc, "skipped_samples": 3}))
    job = SimpleNamespace(directory=str(d), identity={"cluster": 0}, json_name=EXPERT_JSON)
    status = RunStatus(name="e", kind="expert", cluster=0, objective="ddpm", status="queued")
    assert _reuse(job, status) and status.status == "reused"
    assert status.skipped_samples == 3


def test_sweep_spec_holds_the_latent_space_and_data_not_loading_settings(tmp_path):
    import shutil

    from hdd_ray.sweep import describe

    vae = tmp_path / "vae"
    vae.mkdir()  # what vae_info reads: a diffusers AutoencoderKL config and a weights file
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                 "block_out_channels": [8, 8]}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-a")
    shutil.copytree(vae, tmp_path / "moved")
    root = tmp_path / "root"

    def spec(*extra: str) -> dict:
        return describe(load_config(overrides=[f"root={root}", *extra]))

    base = spec(f"latents.vae={vae}")
    assert base["latents"]["sha256"] and base["data_hash"] is None  # not prepared yet
    assert spec(f"latents.vae={tmp_path / 'moved'}") == base  # where the VAE lies: no change
    assert spec(f"latents.vae={vae}", "experts.data.decode_workers=7",
                "router.data.prefetch_batches=9") == base  # how fast data loads: no change
    assert spec(f"latents.vae={vae}", "latents.scaling_factor=0.5") != base
    assert spec()["latents"] is None  # pixel space
    (tmp_path / "moved" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-bb")
    assert spec(f"latents.vae={tmp_path / 'moved'}") != base  # other weights: other results
    os.makedirs(CampaignPaths(str(root)).clusters)
    with open(CampaignPaths(str(root)).manifest, "w") as f:
        json.dump({"k": 8, "clusters": [], "data_hash": "d1"}, f)
    assert spec(f"latents.vae={vae}")["data_hash"] == "d1"


# ------------------------------------------------------------------------ one writer


def test_run_lock_is_exclusive_across_holders_and_released_on_exit(tmp_path):
    first, second = RunLock(str(tmp_path / "e")), RunLock(str(tmp_path / "e"))
    assert first.try_acquire() and not second.try_acquire()
    assert f"pid {os.getpid()}" in second.holder()
    waited: list[str] = []

    def later() -> None:
        time.sleep(0.5)
        first.release()

    threading.Thread(target=later).start()
    with second.hold(on_wait=waited.append, poll_s=0.1) as did_wait:
        assert did_wait and waited and not first.try_acquire()
    assert first.try_acquire()
    first.release()


def test_lease_on_object_store_layout_takes_over_only_a_stale_lease(tmp_path):
    """The lease protocol (what s3:// / gs:// roots use), through the same pyarrow storage."""
    d = str(tmp_path / "e")
    first = RunLock(d, mode="lease", ttl_s=1.5, heartbeat_s=0.3, settle_s=0.1)
    second = RunLock(d, mode="lease", ttl_s=1.5, heartbeat_s=0.3, settle_s=0.1)
    assert first.try_acquire()
    time.sleep(2.0)  # heartbeats keep it live past its ttl
    assert not second.try_acquire() and "another launcher" in second.holder()
    first.stop_heartbeat()  # what a crashed holder looks like
    time.sleep(2.0)
    assert second.try_acquire()
    first.held = True  # the old holder wakes up: releasing must not remove the new lease
    first.release()
    assert storage.read_json(os.path.join(d, ".writer.lease.json"))["token"] == second.token
    second.release()
    assert not os.path.exists(os.path.join(d, ".writer.lease.json"))


# ------------------------------------------------------------------------ drain under an outage


class _HangingServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung MLflow)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_drain_checkpoint_never_waits_on_an_unreachable_mlflow(tmp_path, monkeypatch):
    from hdd_ray.training.loop import LocalHooks, run_loop
    from hdd_ray.training.settings import RunSettings

    # MLflow's own patience: a synchronous flush would block 60 s per try
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = _HangingServer()
    root = tmp_path / "root"
    from hdd_ray.corpus import write_demo_corpus

    shards = write_demo_corpus(str(tmp_path / "corpus"), shard_size=200)[:1]
    events: dict[str, float] = {}

    class DrainedAtStep10(LocalHooks):
        def preempted(self) -> bool:  # the node's drain notice, as get_preemption_info gives it
            events["notice"] = time.time()
            return True

        def report(self, metrics, state, wait=False):
            super().report(metrics, state, wait)
            if state is not None:
                events.setdefault("checkpoint", time.time())

    cfg = load_config(overrides=[f"root={root}", "experts.train.steps=10",
                                 "experts.train.checkpoint_every=1000",
                                 "experts.train.batch_size=8"])
    expert = resolve_experts(cfg)[0]
    from dataclasses import asdict

    outbox = tracking.Outbox(str(root))
    config = {"kind": "expert", "train": expert.train, "expert": asdict(expert),
              "shards": shards, "image_size": cfg.corpus.image_size,
              "channels": cfg.corpus.channels, "use_gpu": False, "torch_threads": 1,
              "tracking": {"uri": f"http://127.0.0.1:{server.port}", "run_id": "0" * 32,
                           "outbox": outbox.directory}}
    try:
        started = time.time()
        run_loop(RunSettings.from_dict(config), DrainedAtStep10(str(tmp_path / "ckpt")))
        total = time.time() - started
    finally:
        server.close()
    assert (tmp_path / "ckpt" / "state.pt").exists()
    assert events["checkpoint"] - events["notice"] < 5.0  # a 30 s spot notice is plenty
    assert total < 45  # the end of the run is bounded too (close), far below 60 s
    kept = [storage.read_json(p) for p in outbox.records()]
    points = [m for r in kept for m in r["metrics"]]
    assert {m[0] for m in points} == {"loss", "loss_smoothed", "data_wait_share"}
    assert points[0][3] == 10


# ------------------------------------------------------------------------ Ray: real campaigns

BASE = [
    "clustering.k=3", "clustering.fine_centroids=12", "sampling.k=2",
    "experts.ddpm_clusters=[0]", "experts.train.batch_size=16", "experts.train.steps=20",
    "experts.train.checkpoint_every=10", "experts.resources.cpus_per_worker=0.25",
    "ray.max_concurrent_experts=0", "evaluation.enabled=false",
]


def _cfg(root: Path, *extra: str):
    return load_config(overrides=[f"root={root}", *BASE, *extra])


@pytest.mark.ray
def test_two_launchers_train_each_expert_once_then_damaged_runs_are_repaired(prepared, tmp_path):
    from hdd_ray.progress import format_table
    from hdd_ray.training.launcher import train_campaign

    root = copy_root(prepared, tmp_path)
    cfg = _cfg(root, "tracking.enabled=false")
    out: dict[int, list] = {}

    def launch(i: int) -> None:
        out[i] = train_campaign(cfg, include_router=False)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=400)
    by_name: dict[str, list[str]] = {}
    for statuses in out.values():
        for s in statuses:
            by_name.setdefault(s.name, []).append(s.status)
    assert len(by_name) == 3, format_table(out[0] + out[1])
    for name, seen in by_name.items():  # one launcher trained it, the other waited and reused
        assert sorted(seen) == ["reused", "trained"], (name, format_table(out[0] + out[1]))
    waited = [s for statuses in out.values() for s in statuses if s.status == "reused"]
    assert all("waited for another launcher" in s.reason for s in waited)
    dirs = {s.cluster: root / "experts" / s.name for s in out[0]}
    for d in dirs.values():
        desc = json.loads((d / EXPERT_JSON).read_text())
        assert len(desc["attempts"]) == 1  # trained once, by one launcher
        if cfg.ray.executor == "train":
            snapshot = (d / "checkpoint_manager_snapshot.json").read_text()
            listed = [c.name for c in d.glob("checkpoint_*") if c.is_dir()]
            assert listed and all(name in snapshot for name in listed)  # none pruned
        else:  # the demo's task executor: one checkpoint directory, written by one launcher
            state = torch.load(d / "checkpoint_task" / "state.pt", weights_only=True)
            assert state["step"] == 20 and len(state["history"]) == 1

    # damage: cluster 0's weights cut short, cluster 1's expert.json cut short; 2 untouched
    w0 = dirs[0] / WEIGHTS
    w0.write_bytes(w0.read_bytes()[:100])
    j1 = dirs[1] / EXPERT_JSON
    j1.write_text(j1.read_text()[:50])
    again = {s.cluster: s for s in train_campaign(cfg, include_router=False)}
    table = format_table(list(again.values()))
    assert again[0].ok and "checksum mismatch" in again[0].reason, table
    assert again[1].ok and "expert.json is unreadable" in again[1].reason, table
    assert again[2].status == "reused" and not again[2].reason, table
    for c, d in dirs.items():
        ident = json.loads((d / EXPERT_JSON).read_text())["identity"]
        assert existing_state(str(d), ident, EXPERT_JSON) == ("finished", ""), c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(db: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store), without MLflow's job runner (seven
    huey consumer processes for its GenAI jobs, which hdd_ray never submits: they only tripled
    the server's start on 2 cores)."""
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(db.parent / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.ray
def test_mlflow_server_stopped_mid_campaign_loses_nothing(prepared, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from hdd_ray.progress import format_table
    from hdd_ray.training.launcher import train_campaign

    # the launcher's calls to the stopped server fail at once (each waited ~3 s on the
    # library's fail-fast retries: ~12 s of this test); what they kept is what is under test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = copy_root(prepared, tmp_path)
    db, port = tmp_path / "mlflow.db", _free_port()
    server = _mlflow_server(db, port)
    uri = f"http://127.0.0.1:{port}"
    cfg = _cfg(root, f"tracking.uri={uri}", "experts.train.steps=30",
               "ray.executor=task")  # MLflow is under test, not Ray Train
    stopped: list[float] = []

    def stop_at_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not stopped:
            if list((root / "experts").glob("*/checkpoint_*")):
                _stop(server)
                stopped.append(time.time())
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_at_first_checkpoint)
    watcher.start()
    try:
        statuses = train_campaign(cfg, only=[0, 1], include_router=False)
    finally:
        watcher.join(timeout=5)
        if not stopped:
            _stop(server)
    table = format_table(statuses)
    assert stopped, "the server was never stopped"
    assert [s.status for s in statuses] == ["trained", "trained"], table  # the table survives
    outbox = tracking.Outbox(str(root))
    assert outbox.records(), "nothing was kept for later"

    server = _mlflow_server(db, port)
    try:
        delivered, left = tracking.sync_outbox(cfg)
        assert delivered > 0 and left == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        for s in statuses:
            runs = client.search_runs([exp.experiment_id], f"tags.run_key = '{s.name}'")
            assert len(runs) == 1, s.name
            run = runs[0]
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
            assert steps[-1] == 30 and 10 in steps, (s.name, steps)  # before and after the stop
            assert run.data.tags.get("status") == "trained" and run.info.status == "FINISHED"
    finally:
        _stop(server)
