"""What the training tests share: the K = 3 campaign's settings, copies of the session's
prepared campaign, and waiting for a run's checkpoints (tests/test_training.py,
tests/test_preemption.py)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import torch

from hdd_ray.config import load_config
from hdd_ray.training.checkpoints import STATE_FILE
from hdd_ray.training.launcher import train_campaign

ROOT = Path(__file__).resolve().parent.parent

BASE = [
    "clustering.k=3", "clustering.fine_centroids=12", "sampling.k=2",
    "experts.ddpm_clusters=[0]", "experts.train.batch_size=32",
    "experts.resources.cpus_per_worker=0.25", "router.resources.cpus_per_worker=0.25",
    "ray.max_concurrent_experts=0",  # all at once: the kill tests need every run started
    "evaluation.enabled=false",
    "ray.executor=train",  # these modules test Ray Train (the task executor: where they say so)
]


def campaign_cfg(root: Path, *extra: str):
    """The K = 3 campaign at ``root`` with :data:`BASE` and ``extra`` overrides."""
    return load_config(overrides=[f"root={root}", *BASE, *extra])


def copy_root(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the campaign ``prepared`` as ``<tmp_path>/root``."""
    root = tmp_path / "root"
    shutil.copytree(prepared, root)
    return root


def expert_dirs(root: Path) -> dict[int, Path]:
    """The campaign's expert run directories by cluster."""
    out = {}
    for d in (root / "experts").iterdir():
        if d.is_dir() and d.name.startswith("c"):
            out[int(d.name.split("-")[0][1:])] = d
    return out


def checkpoints(d: Path) -> list[Path]:
    return sorted(d.glob("checkpoint_*"))


def registered(d: Path) -> bool:
    snapshot = d / "checkpoint_manager_snapshot.json"
    try:
        return any(c.name in snapshot.read_text() for c in checkpoints(d))
    except OSError:
        return False


def train_in_background(cfg, root: Path, cluster: int = 1, only: list[int] | None = None):
    """``train_campaign`` of one expert (or of ``only``) in a thread -> (thread, result dict
    (``s``: statuses), the run directory of expert ``cluster`` once it exists)."""
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        s=train_campaign(cfg, only=only or [cluster], include_router=False)))
    runner.start()
    while not (root / "experts").exists() or cluster not in expert_dirs(root):
        time.sleep(0.1)
    return runner, result, expert_dirs(root)[cluster]


def state_when_checkpointed(d: Path, timeout: float = 240) -> dict:
    """The state of the first checkpoint Ray Train has registered (an unregistered one may be
    lost when the worker dies, and the run would rightly restart from step 0)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for ckpt in checkpoints(d) if d.exists() and registered(d) else []:
            try:
                return torch.load(ckpt / STATE_FILE, weights_only=True)
            except Exception:
                pass  # still being written
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint appeared in {d}")


def task_state_when_checkpointed(d: Path, timeout: float = 240) -> dict:
    """The state of the task executor's first checkpoint of run directory ``d``."""
    from hdd_ray.training.checkpoints import TASK_CHECKPOINT, TASK_METRICS

    deadline = time.time() + timeout
    while time.time() < deadline:
        if (d / TASK_CHECKPOINT / TASK_METRICS).exists():  # written after its state
            return torch.load(d / TASK_CHECKPOINT / STATE_FILE, weights_only=True)
        time.sleep(0.1)
    raise AssertionError(f"no task checkpoint appeared in {d}")


