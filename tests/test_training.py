"""Experts and the router as independent, preemptible Ray Train runs (real local Ray, CPU), and
the same runs as Ray tasks (``ray.executor=task``: the same weights), the local instance's
queue, and a mixture exported to one folder. Killed workers, drivers and tasks:
tests/test_preemption.py.

The session's prepared demo campaign (K = 3, tests/conftest.py) is copied per test; each test
trains few, tiny runs. Ray Train where it is under test (DDP, killed workers, its checkpoints,
the executors' equivalence), one Ray task per run elsewhere (``ray.executor=task``).
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from helpers_training import (
    BASE,
    ROOT,
    campaign_cfg,
    copy_root,
    expert_dirs,
)

from hdd_ray import storage
from hdd_ray.campaign import EXPERT_JSON, WEIGHTS, load_expert
from hdd_ray.models.expert import WeightsMismatch, load_weights
from hdd_ray.training.launcher import train_campaign

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """The K = 3 campaign trained once: 3 experts (expert 2 on two DDP workers) + the router.

    Ray Train trains experts 1 and 2; expert 0 and then the router are Ray tasks, launched
    beside them by a second launcher (two Ray Train start-ups less: ~14 s each on 2 cores)."""
    from hdd_ray import tracking

    root = copy_root(prepared, tmp_path_factory.mktemp("trained"))
    cfg = campaign_cfg(root, "experts.train.steps=30", "experts.train.checkpoint_every=15",
               "router.train.steps=150", "router.train.checkpoint_every=75",
               # expert 2 runs DDP on two workers: its process group must hold only those two
               "experts.list=[{cluster: 2, resources: {num_workers: 2, cpus_per_worker: 0.25}}]",
               # two Ray Train runs side by side (each run's process group beside another's):
               # four at once only made their start-ups fight over the 2 cores (-15 %)
               "ray.max_concurrent_experts=2")
    as_task = campaign_cfg(root, "experts.train.steps=30", "experts.train.checkpoint_every=15",
                   "router.train.steps=150", "router.train.checkpoint_every=75",
                   "ray.executor=task")
    with tracking.run(cfg, "campaign-test") as parent:
        side: dict = {}
        beside = threading.Thread(target=lambda: side.update(s=train_campaign(
            as_task, only=[0], parent_run_id=parent.run_id)))
        beside.start()
        statuses = train_campaign(cfg, only=[1, 2], include_router=False,
                                  parent_run_id=parent.run_id)
        beside.join()
    return root, cfg, side["s"] + statuses, parent.run_id


def test_campaign_trains_every_expert_and_router_then_reuses_them(trained):
    from mlflow.tracking import MlflowClient

    from hdd_ray import tracking

    root, cfg, statuses, parent_id = trained
    assert [s.status for s in statuses] == ["trained"] * 4, [s.reason for s in statuses]
    experts = expert_dirs(root)
    assert sorted(experts) == [0, 1, 2]
    for cluster, d in experts.items():
        desc = json.loads((d / EXPERT_JSON).read_text())
        assert desc["steps"] == 30 and desc["cluster"] == cluster
        assert desc["objective"] == ("ddpm_eps" if cluster == 0 else "fm_velocity")
        assert desc["node"]["hostname"] and desc["wall_time_s"] > 0
        model, _ = load_expert(str(d))
        cond = model.tokenize(["a digit"] * 2)
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0]), cond)
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # isolation: each expert's collective group holds its own workers only
    groups = {c: json.loads((d / EXPERT_JSON).read_text()) for c, d in experts.items()}
    assert groups[2]["world_size"] == 2 and groups[2]["process_group_size"] == 2
    assert groups[0]["process_group_size"] == 1 and groups[1]["process_group_size"] == 1
    assert [groups[c]["executor"] for c in range(3)] == ["task", "train", "train"]
    router = json.loads(next((root / "router").glob("router-*/router.json")).read_text())
    assert len(router["top1_accuracy_by_t"]) == 10
    # near-clean inputs are easy to route; pure noise is not
    acc = router["top1_accuracy_by_t"]
    assert acc["0.05"] > acc["0.95"]

    # MLflow: one nested run per expert + router under the campaign run, with loss curves
    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4
    for run in children:
        steps = 150 if run.data.tags["kind"] == "router" else 30
        assert run.data.tags["status"] == "trained"
        assert run.data.metrics["steps"] == steps
        # the loss curve is logged every 10 steps
        assert len(client.get_metric_history(run.info.run_id, "loss")) == steps // 10

    # re-running the finished campaign trains nothing
    mtimes = {p: p.stat().st_mtime for d in experts.values() for p in d.rglob("*")}
    again = train_campaign(cfg)
    assert [s.status for s in again] == ["reused"] * 4
    assert mtimes == {p: p.stat().st_mtime for d in experts.values() for p in d.rglob("*")}


def test_a_mixture_may_leave_an_expert_out_without_training(trained):
    """``D - F``: expert 1 is not loaded, never evaluated, and not among the mixture's experts
    (its id, and so the cache entry, differs from the full mixture's)."""
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import evaluate_mixture

    _, cfg, _, _ = trained
    spec = MixtureSpec.from_config(cfg, num_samples=16, steps=3, retired=[1])
    result = evaluate_mixture(cfg, spec)
    assert result["assignment"] == "D - F" and result["retired"] == [1]
    assert result["expert_evaluations"][1] == 0 and result["expert_share"][1] == 0
    assert len(result["experts"]) == 2 and not any("c1-" in e for e in result["experts"])
    assert result["mixture_id"] != evaluate_mixture(
        cfg, MixtureSpec.from_config(cfg, num_samples=16, steps=3))["mixture_id"]


def test_mixture_of_ddpm_and_fm_experts_is_evaluated_and_tracked(trained):
    from mlflow.tracking import MlflowClient

    from hdd_ray import tracking
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import evaluate_mixture

    root, cfg, _, parent_id = trained
    spec = MixtureSpec.from_config(cfg, num_samples=48, steps=6)
    assert spec.assignment(3) == "D F F"
    result = evaluate_mixture(cfg, spec, parent_run_id=parent_id)
    assert not result["reused"]
    for key in ("fid", "fid_floor", "clip_score", "diversity"):
        assert result[key] == result[key] and result[key] >= 0, key  # finite, not NaN
    assert result["diversity_metric"] == "feature_diversity"
    assert abs(sum(result["expert_share"]) - 1) < 1e-9
    # top-2 of 3 experts: every evaluation step runs exactly 2 experts per sample
    assert sum(result["expert_evaluations"]) == 2 * 48 * (2 * 6 - 1)  # Heun: 2 calls/step but last
    directory = root / "mixtures" / result["mixture_id"]
    assert (directory / "metrics.json").exists() and (directory / "grid.png").exists()
    client = MlflowClient(tracking.tracking_uri(cfg))
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        f"tags.mixture_id = '{result['mixture_id']}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert {"fid", "fid_floor", "clip_score", "diversity"} <= set(run.data.metrics)
    assert run.data.params["assignment"] == "D F F"
    assert run.data.tags["num_samples"] == "48" and run.data.tags["steps"] == "6"
    assert run.data.tags["extractor"].startswith("clip:reference")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any("images" in a or "samples" in a for a in artifacts), artifacts
    # the same mixture again is reused, not re-sampled
    assert evaluate_mixture(cfg, spec)["reused"]
    # FID and its floor at one n, with intervals; per-sample data kept for paired comparisons
    assert result["fid_n"] == 48 and result["fid_low"] <= result["fid"] <= result["fid_high"]
    assert (directory / "per_sample.safetensors").exists()
    # a mixture cached by an evaluation without intervals is evaluated again, not mixed in
    stale = json.loads((directory / "metrics.json").read_text())
    del stale["evaluation_version"]
    (directory / "metrics.json").write_text(json.dumps(stale))
    again = evaluate_mixture(cfg, spec)
    assert not again["reused"] and again["fid"] == pytest.approx(result["fid"])
    # a later judge of the campaign loads the cached reference CLIP and statistics without
    # decoding the training split
    from hdd_ray.evaluation.judge import Judge

    judge = Judge(cfg)
    assert not judge.decoded_train and judge.clip_info["loaded"]
    assert judge.reference.num_samples > len(judge.heldout)


def test_the_judge_reads_the_training_split_a_batch_at_a_time_and_keeps_a_bounded_held_out(
        trained, tmp_path, monkeypatch):
    """At the paper's size the training split is terabytes of decoded images: the reference
    statistics are running sums over batches, the same numbers as from the whole split in
    memory; the judge keeps ``evaluation.num_samples`` held-out samples, not the split."""
    from hdd_ray import samples
    from hdd_ray.campaign import cluster_info, cluster_shards, load_manifest
    from hdd_ray.evaluation import judge as judge_module
    from hdd_ray.evaluation.judge import Judge, training_sample
    from hdd_ray.evaluation.metrics import reference_stats

    root = copy_root(trained[0], tmp_path)
    shutil.rmtree(root / "evaluation" / "reference_stats")  # the reference CLIP stays cached
    cfg = campaign_cfg(root, "evaluation.num_samples=40")
    monkeypatch.setattr(samples, "EVAL_READ_BATCH", 50)
    monkeypatch.setattr(judge_module, "HELDOUT_MIN", 30)  # keeps max(num_samples, this)
    sizes, real = [], samples.iter_split

    def watching(*args, **kwargs):
        for batch in real(*args, **kwargs):
            sizes.append(len(batch))
            yield batch

    monkeypatch.setattr(samples, "iter_split", watching)
    judge = Judge(cfg)
    manifest = load_manifest(cfg)
    train_count = sum(int(cluster_info(manifest, c)["count"]) for c in range(3))
    assert len(judge.heldout) == 40 and judge.decoded_train and judge.clip_info["loaded"]
    assert judge.reference.num_samples == train_count > 20 * 50
    assert max(sizes) <= 50  # never more than a batch of the split at once
    shards = [s for c in range(3) for s in cluster_shards(cfg, manifest, c)]
    whole = samples.read_cluster(shards, 8, 1)
    in_memory = reference_stats(whole.images, judge.extractor, "whole")
    assert in_memory.num_samples == train_count
    assert torch.allclose(judge.reference.features_sum, in_memory.features_sum, rtol=1e-5)
    assert torch.allclose(judge.reference.features_cov_sum, in_memory.features_cov_sum,
                          rtol=1e-5, atol=1e-6)
    # the reference CLIP's bounded sample covers every cluster in proportion to its size
    counts = [int(cluster_info(manifest, c)["count"]) for c in range(3)]
    sample = training_sample(cfg, manifest, 300)
    per_cluster = torch.bincount(sample.labels, minlength=3).tolist()
    assert per_cluster == [300 * n // train_count for n in counts] and sum(per_cluster) <= 300
    assert len(training_sample(cfg, manifest, 10**6)) == train_count  # small: the whole split


def test_router_accuracy_reads_a_bounded_sample_and_its_failure_never_fails_the_run(
        trained, tmp_path, monkeypatch, caplog):
    """The router's accuracy decodes at most ``max_samples`` held-out samples, a batch at a time
    (at the paper's size the held-out split is 110k images); a report that fails after the
    weights are exported is a warning: the run is trained, its description written."""
    import logging
    from types import SimpleNamespace

    from hdd_ray import samples
    from hdd_ray.campaign import load_router
    from hdd_ray.evaluation.router import router_accuracy_by_t
    from hdd_ray.training.checkpoints import FinalWeights
    from hdd_ray.training.export import export_run

    root, cfg, _, _ = trained
    router = load_router(cfg)
    decoded, real = [0], samples.decode_sample

    def counting(*args, **kwargs):
        decoded[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(samples, "decode_sample", counting)
    few = router_accuracy_by_t(router, cfg, max_samples=40)
    assert decoded[0] == 40 and len(few) == 10 and all(0 <= a <= 1 for a in few.values())
    assert router_accuracy_by_t(router, cfg, max_samples=40) == few  # the same noise each time
    decoded[0] = 0
    full = router_accuracy_by_t(router, cfg)
    held_out = decoded[0]
    assert 40 < held_out < 4096 and full != few  # the whole (small) split: more samples

    def broken(weights_path: str) -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 86 GiB\nmore detail")

    job = SimpleNamespace(directory=str(tmp_path / "run"), report=broken, identity={"k": 3},
                          kind="router", name="router-x", describe={}, json_name="router.json",
                          executor="task")
    weights = {k: v.detach() for k, v in router.state_dict().items()}
    final = FinalWeights(weights, 150, [{"start_step": 0, "node_id": None}], 1.0)
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        desc, extra = export_run(job, final, {"loss": 0.5}, None)
    assert extra == {} and desc["steps"] == 150
    assert json.loads((tmp_path / "run" / "router.json").read_text())["steps"] == 150
    warned = [r.getMessage() for r in caplog.records if "no report" in r.getMessage()]
    assert warned == ["router-x: no report on its weights: CUDA out of memory. Tried to "
                      "allocate 86 GiB"]


def test_foreign_expert_and_mismatched_weights_are_rejected(trained, tmp_path):
    root, cfg, _, _ = trained
    root = copy_root(root, tmp_path)
    cfg = campaign_cfg(root, "experts.train.steps=30", "experts.train.checkpoint_every=15",
               "router.train.steps=150", "router.train.checkpoint_every=75",
               "experts.list=[{cluster: 2, resources: {num_workers: 2, cpus_per_worker: 0.25}}]")
    experts = expert_dirs(root)
    # an expert on storage that belongs to another campaign is rejected with one line
    desc_path = experts[1] / EXPERT_JSON
    desc = json.loads(desc_path.read_text())
    desc["identity"]["objective"] = "ddpm_eps"
    desc_path.write_text(json.dumps(desc))
    rejected = train_campaign(cfg, only=[1], include_router=False)
    assert rejected[0].status == "rejected"
    assert "objective: 'ddpm_eps' here vs 'fm_velocity' in the campaign" in rejected[0].reason
    assert "\n" not in rejected[0].reason
    assert json.loads(desc_path.read_text()) == desc  # nothing already trained is touched

    # weights that do not fit the architecture are refused, never half-loaded
    from hdd_ray.models.expert import ExpertModel

    deeper = ExpertModel("DiT-S/8", desc["text"], 8, 1)
    with pytest.raises(WeightsMismatch, match="do not match the architecture .missing") as info:
        load_weights(deeper, str(experts[0] / WEIGHTS), "expert c0")
    assert "\n" not in str(info.value)
    narrower_text = ExpertModel(desc["architecture"], {**desc["text"], "dim": 32}, 8, 1)
    before = {k: v.clone() for k, v in narrower_text.state_dict().items()}
    with pytest.raises(WeightsMismatch, match="weight .* has shape") as info:
        load_weights(narrower_text, str(experts[0] / WEIGHTS), "expert c0")
    assert "\n" not in str(info.value)
    after = narrower_text.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_local_instance_queues_runs_that_do_not_fit_together():
    from hdd_ray.placement import ResourceGate

    gate = ResourceGate({"CPU": 2.0, "GPU": 1.0})
    big = {"num_workers": 1, "cpus_per_worker": 1.5, "gpus_per_worker": 0.0, "custom": {}}
    gpu = {"num_workers": 2, "cpus_per_worker": 0.25, "gpus_per_worker": 0.5, "custom": {}}
    assert gate.need(gpu) == {"CPU": 0.5, "GPU": 1.0}
    events: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def run(name: str, hold_until: threading.Event | None) -> None:
        with gate.hold(big):
            events.append(f"{name} in")
            if hold_until is not None:
                first_in.set()
                hold_until.wait(10)
            events.append(f"{name} out")

    a = threading.Thread(target=run, args=("a", release))
    a.start()
    first_in.wait(10)
    b = threading.Thread(target=run, args=("b", None))
    b.start()
    b.join(0.3)
    assert b.is_alive() and events == ["a in"]  # 1.5 + 1.5 CPUs do not fit in 2: b waits
    with gate.hold(gpu):  # 0.5 CPU + 1 GPU still fit beside a
        pass
    release.set()
    a.join(10), b.join(10)
    assert events == ["a in", "a out", "b in", "b out"] and gate.free == gate.capacity
    assert gate.unfit(gpu) == ""
    assert gate.unfit({**gpu, "gpus_per_worker": 1}).startswith(
        "asks for 2 GPU in all (2 workers) but the local Ray instance has 1")
    assert gate.unfit({**gpu, "accelerator_type": "A100"}).startswith(
        "asks for accelerator_type A100 but the local Ray instance has no such accelerator")


def test_campaign_on_a_local_instance_runs_experts_that_fill_it_one_at_a_time(
        prepared, tmp_path, monkeypatch):
    from hdd_ray.training import launcher

    root = copy_root(prepared, tmp_path)
    # each expert asks for both CPUs of the local instance: the launcher must start one at a time
    # (the local gate queues runs of either executor: here Ray tasks)
    cfg = campaign_cfg(root, "experts.train.steps=10", "experts.train.checkpoint_every=10",
               "tracking.enabled=false", "experts.resources.cpus_per_worker=2",
               "ray.executor=task")
    lock, running, peak = threading.Lock(), [0], [0]
    real_train = launcher._train

    def counted(job, mlf, status, *args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real_train(job, mlf, status, *args, **kwargs)  # the real run (a Ray task)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(launcher, "_train", counted)
    statuses = train_campaign(cfg, only=[1, 2], include_router=False)
    assert [s.status for s in statuses] == ["trained", "trained"], [s.reason for s in statuses]
    assert peak[0] == 1


def test_expert_larger_than_the_local_instance_fails_before_ray_train(prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    cfg = campaign_cfg(root, "experts.train.steps=20", "tracking.enabled=false",
               "experts.list=[{cluster: 1, resources: {cpus_per_worker: 64}}]")
    (status,) = train_campaign(cfg, only=[1], include_router=False)
    assert status.status == "failed" and "\n" not in status.reason
    # per worker: no node of the local instance can host one worker of it (placement.py)
    assert status.reason.startswith("asks for 64 CPU per worker but no node of the local Ray "
                                    "instance has more than 2")
    assert not (root / "experts").exists() or not any((root / "experts").iterdir())


def test_train_expert_job_rejects_an_unknown_expert(prepared, tmp_path, capsys):
    import importlib

    root = copy_root(prepared, tmp_path)
    train_expert = importlib.import_module("jobs.train_expert")  # in process: no Ray needed
    assert train_expert.main(["--expert", "7", f"root={root}", *BASE]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: --expert '7' is neither an index 0..2")
    assert len(err.strip().splitlines()) == 1
    # the main job, as a process: a corpus that does not exist is refused before Ray starts
    missing = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_all_experts.py"),
                              f"root={tmp_path / 'nowhere'}", "corpus.source=webdataset",
                              f"corpus.uri={tmp_path / 'no-shards'}",
                              "tracking.enabled=false"],  # no MLflow store to create: 3x faster
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: corpus ")
    assert "Ray instance" not in missing.stderr  # failed before any Ray resource
    assert not glob.glob(str(tmp_path / "nowhere" / "experts" / "*"))
    assert storage.exists(str(root / "clusters" / "manifest.json"))


def test_task_executor_trains_the_same_weights_as_ray_train(trained, tmp_path):
    """Expert 1 of the trained campaign (a Ray Train run) trained again as a Ray task on a copy
    without it: the same expert id, bit-identical exported weights (same loop, seeds and thread
    count), and only the task executor's run without a Ray Train snapshot."""
    from safetensors.torch import load_file

    trained_root = trained[0]
    root = copy_root(trained_root, tmp_path)
    shutil.rmtree(expert_dirs(root)[1])
    cfg = campaign_cfg(root, "experts.train.steps=30", "experts.train.checkpoint_every=15",
               "ray.executor=task", "tracking.enabled=false")
    (status,) = train_campaign(cfg, only=[1], include_router=False)
    assert status.status == "trained", status.reason
    out = {}
    for executor, top in (("task", root), ("train", trained_root)):
        d = expert_dirs(top)[1]
        desc = json.loads((d / EXPERT_JSON).read_text())
        assert desc["executor"] == executor and desc["steps"] == 30
        assert (d / "checkpoint_manager_snapshot.json").exists() == (executor == "train")
        out[executor] = (d.name, load_file(str(d / WEIGHTS)))
    (task_id, task_w), (train_id, train_w) = out["task"], out["train"]
    assert task_id == train_id  # the executor is not part of what the expert is
    assert task_w.keys() == train_w.keys()
    assert all(torch.equal(task_w[k], train_w[k]) for k in task_w)


# ------------------------------------------------------------------ a mixture in one folder

#: the trained campaign's settings (``trained``) and the mixture evaluated above (48 samples,
#: 6 steps), as a job's command line
EXPORT = [*BASE, "experts.train.steps=30", "experts.train.checkpoint_every=15",
          "router.train.steps=150", "router.train.checkpoint_every=75", "sampling.steps=6",
          "evaluation.num_samples=48"]
PROMPTS = ["a handwritten digit seven", "the number 3, handwritten", "a handwritten 0"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The campaign's evaluated mixture (D F F) exported once by jobs/export_mixture.py, logged
    to the campaign's MLflow store and registered as ``digits``."""
    import importlib

    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import evaluate_mixture

    root, cfg, _, _ = trained
    # the evaluation of test_mixture_of_ddpm_and_fm_experts_... (reused when it ran)
    evaluate_mixture(cfg, MixtureSpec.from_config(cfg, num_samples=48, steps=6))
    out = tmp_path_factory.mktemp("export") / "digits"
    export = importlib.import_module("jobs.export_mixture")
    assert export.main(["--out", str(out), "--register", "digits", f"root={root}", *EXPORT]) == 0
    return out


def test_an_exported_mixture_samples_the_campaigns_images_anywhere_without_the_campaign(
        trained, exported, tmp_path, monkeypatch, capsys):
    """Exported without MLflow (``exported`` evaluated the mixture: the card has metrics)."""
    import importlib

    import hdd_ray
    from hdd_ray.ensemble import load_mixture

    root, cfg, _, _ = trained
    export = importlib.import_module("jobs.export_mixture")
    first = tmp_path / "first"
    assert export.main(["--out", str(first), f"root={root}", *EXPORT,
                        "tracking.enabled=false"]) == 0
    assert "MLflow: not logged" in capsys.readouterr().out
    # every file is in the manifest with its sha256; the card has the metrics' intervals
    manifest = json.loads((first / "manifest.json").read_text())
    files = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert {"README.md", "mixture.json", "montage.png", "router/router.json",
            "router/weights.safetensors", "experts/c0/expert.json",
            "experts/c2/weights.safetensors"} <= files
    described = json.loads((first / "mixture.json").read_text())
    m = described["metrics"]
    assert described["assignment"] == "D F F" and m["fid_low"] <= m["fid"] <= m["fid_high"]
    card = (first / "README.md").read_text()
    assert f"| {m['fid']:.4g} | [{m['fid_low']:.4g}, {m['fid_high']:.4g}] |" in card
    assert "![the clusters, one row each](montage.png)" in card
    reference = load_mixture(cfg).sample(PROMPTS, seed=3, steps=6)  # the folder: its 6 steps

    # the folder moved; the campaign out of reach; loaded and sampled from another directory
    moved = tmp_path / "far" / "mixture"
    shutil.move(first, moved)
    away = root.with_name(root.name + "-away")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    root.rename(away)
    try:
        mixture = hdd_ray.Mixture.from_folder("../far/mixture")
        images = mixture.sample(PROMPTS, seed=3)
        sample = importlib.import_module("jobs.sample")
        assert sample.main(["--mixture-dir", "../far/mixture", "--prompt", PROMPTS[0],
                            "--num", "2", "--device", "cpu"]) == 0
    finally:
        away.rename(root)
    assert torch.equal(images, reference)
    assert mixture.assignment == "D F F" and len(list((elsewhere / "samples").glob("*.png"))) == 1


def test_an_export_leaves_out_the_experts_its_mixture_leaves_out(trained, tmp_path):
    import importlib

    import hdd_ray
    from hdd_ray.ensemble import load_mixture

    root, cfg, _, _ = trained
    export = importlib.import_module("jobs.export_mixture")
    out = tmp_path / "retired"
    assert export.main(["--assignment", "D - F", "--out", str(out), f"root={root}", *EXPORT,
                        "tracking.enabled=false"]) == 0
    described = json.loads((out / "mixture.json").read_text())
    assert described["assignment"] == "D - F" and described["spec"]["retired"] == [1]
    assert [e["cluster"] for e in described["experts"]] == [0, 2]
    assert not (out / "experts" / "c1").exists()
    assert "Left out (`-`): cluster 1" in (out / "README.md").read_text()
    mixture = hdd_ray.Mixture.from_folder(str(out))
    assert mixture.assignment == "D - F" and mixture.retired == (1,)
    reference = load_mixture(cfg, retired=[1]).sample(PROMPTS, seed=1, steps=6)
    assert torch.equal(mixture.sample(PROMPTS, seed=1), reference)


def test_a_damaged_mixture_folder_is_refused_in_one_line_naming_the_file(exported, tmp_path,
                                                                         capsys):
    import importlib

    import hdd_ray
    from hdd_ray.errors import MixtureError

    sample = importlib.import_module("jobs.sample")
    for rel, damage in (("experts/c1/weights.safetensors", "flip"),
                        ("experts/c0/expert.json", "flip"), ("router/router.json", "delete"),
                        ("mixture.json", "flip")):
        folder = tmp_path / rel.replace("/", "_")
        shutil.copytree(exported, folder)
        path = folder / rel
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        with pytest.raises(MixtureError) as refused:
            hdd_ray.Mixture.from_folder(str(folder))
        message = str(refused.value)
        assert len(message.splitlines()) == 1 and str(path) in message, message
        assert sample.main(["--mixture-dir", str(folder), "--prompt", "a 7", "--device",
                            "cpu", "--out", str(tmp_path / "no.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    assert not (tmp_path / "no.png").exists()


def test_the_export_is_a_registered_mlflow_model_that_loads_and_draws_images(
        trained, exported, monkeypatch):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    import hdd_ray
    from hdd_ray import tracking
    from hdd_ray.registry import to_uint8

    _, cfg, _, _ = trained
    uri = tracking.tracking_uri(cfg)  # the campaign's sqlite store
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("digits", "champion")  # the first: champion
    described = json.loads((exported / "mixture.json").read_text())
    assert version.tags["mixture_id"] == described["metrics"]["mixture_id"]
    assert float(version.tags["fid"]) == pytest.approx(described["metrics"]["fid"])
    assert version.tags["evaluation_key"] == described["evaluation_key"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/digits@champion")
    assert model.metadata.get_input_schema().input_names() == ["prompt", "seed"]
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, 8, 8, 1)
    frame = pd.DataFrame({"prompt": PROMPTS[:2], "seed": [5, 5]})
    images = model.predict(frame)
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 1)
    expected = to_uint8(hdd_ray.Mixture.from_folder(str(exported)).sample(PROMPTS[:2], seed=5))
    np.testing.assert_array_equal(images, expected)
    # a row without a seed uses the folder's; params change the steps
    assert model.predict(pd.DataFrame({"prompt": ["a 4"]}), params={"steps": 2}).shape == (
        1, 8, 8, 1)
