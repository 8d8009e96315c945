"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests also run from a plain checkout (no pip install)
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray instance (2 CPUs, no dashboard), shared by every test that asks.

    Starting Ray costs several seconds on 2 cores, so it happens once per session.
    ``address="local"`` always starts a new instance: a leftover ``/tmp/ray`` cluster file
    from a killed cluster cannot capture the tests.
    """
    import os

    import ray

    from hdd_ray.placement import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
