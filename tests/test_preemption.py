"""Runs that lose their worker, their driver or their data mid-training, under Ray Train and
as Ray tasks (real local Ray, CPU): each resumes from its last checkpoint with the exact step
count, or fails alone in one line.

The session's prepared demo campaign (K = 3, tests/conftest.py) is copied per test. A module of
its own (not part of tests/test_training.py) so that the parallel test run (pytest-xdist,
``--dist loadfile``) gives these runs and the trained campaign's to different workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers_training import (
    BASE,
    ROOT,
    campaign_cfg,
    copy_root,
    expert_dirs,
    state_when_checkpointed,
    task_state_when_checkpointed,
    train_in_background,
)

from hdd_ray.campaign import EXPERT_JSON
from hdd_ray.training.checkpoints import STATE_FILE
from hdd_ray.training.launcher import train_campaign

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def failures(prepared, tmp_path_factory):
    """One Ray Train launch of two experts, each meeting its own fate: expert 1 trains DDP on
    two workers without caption dropout (``y_null`` is then never used: not trained, so DDP
    does not wait for its gradient), in two micro-batches of 8 per worker (the first under
    ``no_sync``), and its rank 0 is SIGKILLed after its first registered
    checkpoint (Ray Train restarts the group, which resumes and trains to the end), expert 2
    has no usable data (``max_failures: 0``: it fails at once, alone). One launch for two
    tests: Ray Train's start-up is ~10 s of 2 cores per run.

    -> (statuses by cluster, expert 1's run directory, the killed checkpoint's state, steps,
    checkpoint interval)."""
    root = copy_root(prepared, tmp_path_factory.mktemp("failures"))
    for shard in (root / "clusters" / "2").glob("*.tar"):
        shard.write_bytes(b"this is not a tar archive" * 10)
    steps, every = 80, 20  # the kill follows the first checkpoint: 60 steps to spare
    cfg = campaign_cfg(root, f"experts.train.steps={steps}", f"experts.train.checkpoint_every={every}",
               "experts.train.caption_dropout=0",
               "experts.list=[{cluster: 1, micro_batch_size: 8, resources: {num_workers: 2}},"
               " {cluster: 2, resources: {max_failures: 0}}]")
    runner, result, d = train_in_background(cfg, root, only=[1, 2])
    state = state_when_checkpointed(d)
    os.kill(state["history"][-1]["pid"], signal.SIGKILL)  # expert 1's training worker, mid-run
    runner.join(timeout=400)
    return {s.cluster: s for s in result["s"]}, d, state, steps, every


def test_killed_worker_resumes_from_its_last_checkpoint(failures):
    statuses, d, state, steps, every = failures
    assert state["step"] < steps - every, "the run got too far before the kill"
    pid = state["history"][-1]["pid"]
    status = statuses[1]
    assert status.status == "trained", status.reason
    desc = json.loads((d / EXPERT_JSON).read_text())
    assert desc["steps"] == steps  # the exact configured step count
    assert desc["world_size"] == desc["process_group_size"] == 2  # DDP at caption_dropout 0
    starts = [a["start_step"] for a in desc["attempts"]]
    assert len(starts) == 2 and starts[0] == 0
    assert starts[1] > 0, "restarted from step 0"
    assert starts[1] % every == 0  # from a checkpoint: lost at most one interval
    print(f"killed pid {pid} after step {state['step']}; resumed at step {starts[1]}")


def test_killed_task_is_retried_from_its_last_checkpoint_and_its_stream_continues(prepared,
                                                                                 tmp_path):
    """A run of the task executor, streaming forced on, whose task's worker process is killed:
    Ray retries the task in another process, which resumes from the last checkpoint (not from
    0); the step count is exact and the data stream continues from its recorded position (the
    final position is the uninterrupted stream's)."""
    from hdd_ray.campaign import cluster_shards, load_manifest
    from hdd_ray.config import to_dict
    from hdd_ray.samples import Decoding
    from hdd_ray.training.data import StreamSource, data_settings

    root = copy_root(prepared, tmp_path)
    steps, every = 100, 30
    cfg = campaign_cfg(root, f"experts.train.steps={steps}", f"experts.train.checkpoint_every={every}",
               "experts.data.mode=stream", "experts.data.shuffle_buffer=64",
               "experts.data.open_shards=2", "tracking.enabled=false", "ray.executor=task")
    runner, result, d = train_in_background(cfg, root)
    state = task_state_when_checkpointed(d)
    assert state["step"] < steps - every, "the run got too far before the kill"
    os.kill(state["history"][-1]["pid"], signal.SIGKILL)
    runner.join(timeout=400)
    assert result["s"][0].status == "trained", result["s"][0].reason
    desc = json.loads((d / EXPERT_JSON).read_text())
    starts = [a["start_step"] for a in desc["attempts"]]
    assert desc["steps"] == steps and len(starts) == 2 and starts[0] == 0
    assert starts[1] > 0 and starts[1] % every == 0, starts  # from a checkpoint, not from 0
    assert desc["attempts"][1]["pid"] != desc["attempts"][0]["pid"]
    assert desc["skipped_samples"] == 0
    from hdd_ray.training.checkpoints import TASK_CHECKPOINT

    final = torch.load(d / TASK_CHECKPOINT / STATE_FILE, weights_only=True)
    (data,) = final["data"]
    # the same stream, uninterrupted, in this process
    reference = StreamSource([(p, 1) for p in cluster_shards(cfg, load_manifest(cfg), 1)],
                             Decoding(8, 1), data_settings(to_dict(cfg.experts.data)),
                             seed=cfg.experts.train.seed)
    for _ in range(steps):
        reference.next_batch(cfg.experts.train.batch_size)
    reference.close()
    assert data["source"]["count"] == reference.count == steps * cfg.experts.train.batch_size
    assert data["source"]["position"] == reference.position
    assert torch.equal(data["source"]["total"], reference.total)


def test_expert_without_usable_data_fails_alone_under_ray_train(failures):
    by_cluster = failures[0]  # expert 2's shards are not tar archives
    assert by_cluster[1].status == "trained"  # launched with it, trained to the end regardless
    assert by_cluster[2].status == "failed"
    assert "no usable samples" in by_cluster[2].reason and "\n" not in by_cluster[2].reason


def test_expert_without_usable_data_fails_alone_as_a_task(prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    for shard in (root / "clusters" / "1").glob("*.tar"):
        shard.write_bytes(b"this is not a tar archive" * 10)
    cfg = campaign_cfg(root, "experts.train.steps=20", "experts.train.checkpoint_every=10",
               "experts.resources.max_failures=0", "ray.executor=task")
    statuses = train_campaign(cfg, only=[0, 1], include_router=False)
    by_cluster = {s.cluster: s for s in statuses}
    assert by_cluster[0].status == "trained"
    assert by_cluster[1].status == "failed"
    assert "no usable samples" in by_cluster[1].reason and "\n" not in by_cluster[1].reason


def test_killed_driver_rerun_resumes_the_partial_experts(prepared_campaign, tmp_path, ray_local):
    """The job (a driver on this session's Ray instance, ``ray.address``, as on a cluster;
    reusing the prepared corpus) is killed once every expert has a checkpoint: Ray ends the
    dead driver's tasks, and the rerun resumes every expert from its checkpoint (one that
    finished between the last poll and the kill, which a loaded machine allows, is reused).
    The runs are Ray tasks: what is under test is the campaign's state on storage, not Ray
    Train."""
    import ray

    from hdd_ray.training.checkpoints import TASK_CHECKPOINT, TASK_METRICS

    root = prepared_campaign.copy(tmp_path)
    steps, every = 80, 20  # the kill follows every expert's first checkpoint
    common = [f"experts.train.steps={steps}", f"experts.train.checkpoint_every={every}",
              "tracking.enabled=false", "ray.executor=task"]
    # a relative root, as the README's commands give it: the job resolves it against its cwd
    args = [f"root={root.relative_to(tmp_path)}", *BASE, *prepared_campaign.overrides, *common,
            f"ray.address={ray.get_runtime_context().gcs_address}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_all_experts.py"),
                             "--skip-router", *args], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            dirs = expert_dirs(root) if (root / "experts").exists() else {}
            # a task's checkpoint is complete once its metrics file is written (after the state)
            if len(dirs) == 3 and all((d / TASK_CHECKPOINT / TASK_METRICS).exists()
                                      for d in dirs.values()):
                break
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.3)
        else:
            raise AssertionError("no checkpoints appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    # on a loaded machine an expert can finish between the last poll and the kill: it is
    # reused by the rerun; the others (at least two) must resume from their checkpoints
    finished = {c for c, d in expert_dirs(root).items() if (d / EXPERT_JSON).exists()}
    assert len(finished) <= 1, f"experts {sorted(finished)} finished before the kill"
    statuses = train_campaign(campaign_cfg(root, *common), include_router=False)
    assert [s.status for s in statuses] == [
        "reused" if s.cluster in finished else "resumed" for s in statuses], [
        s.reason for s in statuses]
    for cluster, d in expert_dirs(root).items():
        desc = json.loads((d / EXPERT_JSON).read_text())
        starts = [a["start_step"] for a in desc["attempts"]]
        assert desc["steps"] == steps and starts[0] == 0
        if cluster not in finished:
            assert starts[-1] >= every



# ------------------------------------------------------------------ ray.executor=task

def test_a_run_begun_as_a_task_resumes_under_ray_train(prepared, tmp_path):
    """No retries: the killed task fails the run; the next launch, switched to Ray Train,
    resumes from the task's checkpoint (and the progress lines read it)."""
    from hdd_ray.training.checkpoints import latest_checkpoint_step

    root = copy_root(prepared, tmp_path)
    steps, every = 150, 50  # the kill follows the first checkpoint: 100 steps to spare
    common = [f"experts.train.steps={steps}", f"experts.train.checkpoint_every={every}",
              "tracking.enabled=false"]
    cfg = campaign_cfg(root, *common, "ray.executor=task", "experts.resources.max_failures=0")
    runner, result, d = train_in_background(cfg, root)
    state = task_state_when_checkpointed(d)
    os.kill(state["history"][-1]["pid"], signal.SIGKILL)
    runner.join(timeout=400)
    assert result["s"][0].status == "failed"
    assert not (d / EXPERT_JSON).exists()
    reached = latest_checkpoint_step(str(d))
    assert reached is not None and reached >= state["step"]
    (status,) = train_campaign(campaign_cfg(root, *common), only=[1], include_router=False)
    assert status.status == "resumed", status.reason
    desc = json.loads((d / EXPERT_JSON).read_text())
    starts = [a["start_step"] for a in desc["attempts"]]
    assert desc["executor"] == "train" and desc["steps"] == steps
    assert starts[0] == 0 and starts[-1] == reached

