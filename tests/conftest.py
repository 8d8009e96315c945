"""Shared fixtures: one local Ray instance and one prepared demo campaign for each test process
(the suite runs on two pytest-xdist workers, ``pyproject.toml``), and the order in which test
modules start (the longest first). The repository root is on ``sys.path``: tests import the
jobs as modules (``importlib.import_module("jobs.train_expert")``) and call their
``main(argv)`` in process."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests also run from a plain checkout (no pip install)
    sys.path.insert(0, str(REPO_ROOT))


#: the modules that take longest (CPU-seconds on 2 cores), started first so that neither worker
#: is left with a long module at the end; every other module follows in collection order
LONGEST_FIRST = ("test_multinode.py", "test_preemption.py", "test_training.py", "test_sweep.py",
                 "test_grow.py", "test_prepare.py", "test_overfit.py", "test_hardening.py",
                 "test_latents.py", "test_first_run.py", "test_clusters.py",
                 "test_checkpoint_writes.py", "test_distill.py", "test_bench_gpu.py")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's share of the cores for torch: two workers on two cores
    that each ran two threads spent CPU-seconds on threads waiting for each other, with no
    wall time gained (the other worker keeps the second core busy). ``OMP_NUM_THREADS`` passes
    the same share to the processes the tests start (jobs, their Ray drivers)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of :data:`LONGEST_FIRST`'s modules first, in its order (a stable sort: the same
    order in every worker, as pytest-xdist requires)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray instance (2 CPUs, no dashboard), shared by every test of this process
    that asks.

    Starting Ray costs several seconds on 2 cores, so it happens once per test process.
    ``address="local"`` always starts a new instance: a leftover ``/tmp/ray`` cluster file
    from a killed cluster cannot capture the tests.
    """
    import os

    import ray

    from hdd_ray.placement import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Ray Train's controller polls its workers every 2 s: each run's start, checkpoints and end
    # waited on it (~3 s of a 1-worker run's ~13 s on 2 cores); a missed poll is harmless
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


#: the shared campaign: the demo digits in K = 3 clusters, expert 0 DDPM (``prepared_campaign``)
CAMPAIGN = ["clustering.k=3", "clustering.fine_centroids=12", "sampling.k=2",
            "experts.ddpm_clusters=[0]"]


@dataclass(frozen=True)
class PreparedCampaign:
    """A campaign root the prepare stage filled once (read-only: tests work on copies)."""

    root: Path
    #: the settings it was prepared with: the demo digits as a WebDataset corpus outside every
    #: root (so a job's prepare step reuses the result in any copy: the corpus' paths are part
    #: of the prepare fingerprint), and :data:`CAMPAIGN`
    overrides: tuple[str, ...]

    def copy(self, directory: Path) -> Path:
        """A private copy of the campaign as ``<directory>/root``."""
        root = Path(directory) / "root"
        shutil.copytree(self.root, root)
        return root


@pytest.fixture(scope="session")
def prepared_campaign(tmp_path_factory, ray_local) -> PreparedCampaign:
    """The demo digits prepared once per test run (the real prepare stage, on the Ray instance
    of the worker that gets here first) into a K = 3 campaign, shared by test_training,
    test_preemption, test_hardening, test_sweep, test_grow and others through copies."""
    import os

    from filelock import FileLock

    from hdd_ray.config import load_config
    from hdd_ray.corpus import write_demo_corpus
    from hdd_ray.prepare import prepare_corpus

    # one for the whole run: the pytest-xdist workers' temporary roots share a parent; the
    # first worker to get here prepares, the other waits for it and reads the result
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    base = shared / "prepared"
    # the default (demo) config with the shards given by corpus.uri alone: bring-your-own data
    overrides = (f"corpus.uri={base / 'corpus'}", *CAMPAIGN)
    root = base / "root"
    with FileLock(str(shared / "prepared.lock")):
        if (base / "done").exists():
            return PreparedCampaign(root, overrides)
        write_demo_corpus(str(base / "corpus"))
        manifest = prepare_corpus(load_config(overrides=[f"root={root}", *overrides,
                                                         "tracking.enabled=false"]))
        assert manifest["k"] == 3 and not manifest["reused"]
        # those shards were used, not the built-in digits written into the root
        shards = sorted(str(p) for p in (base / "corpus").glob("*.tar"))
        assert manifest["corpus"]["source"] == "webdataset"
        assert manifest["corpus"]["shards"] == shards
        assert not (root / "corpus").exists()
        (base / "done").write_text("")
    return PreparedCampaign(root, overrides)


@pytest.fixture(scope="session")
def prepared(prepared_campaign: PreparedCampaign) -> Path:
    """The prepared campaign's root (tests/test_training.py, tests/test_preemption.py): copy
    it, never write into it."""
    return prepared_campaign.root
