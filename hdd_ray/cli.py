"""What every ``jobs/*.py`` entry point shares: argument parsing and joining Ray.

``python jobs/<job>.py [--config FILE] [--force] [key=value ...]``; a bad config prints one line
``error: ...`` and exits 2 before any Ray resource is requested.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hdd_ray import storage
from hdd_ray.config import CampaignConfig, ConfigError, describe_options, load_config

#: Ray settings every job needs. Many experts starting at once on a small machine take longer
#: than Ray Train's default 60 s to bring up their worker groups.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


def parse_job_args(
    doc: str, argv: list[str] | None = None, extra: list[tuple[str, dict[str, Any]]] | None = None
) -> tuple[CampaignConfig, argparse.Namespace]:
    """Parse a job's command line into a validated config and the remaining flags.

    ``doc`` (the job's module docstring) and every config option with its default are shown
    by ``--help``. ``extra`` adds job-specific flags as ``(name, argparse kwargs)``.
    On a config problem prints ``error: <one line>`` to stderr and exits with status 2.
    """
    parser = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config options (key=value):\n" + describe_options(),
    )
    parser.add_argument("--config", default=None, help="campaign YAML (default: the demo)")
    parser.add_argument("--force", action="store_true", help="recompute instead of reusing")
    for name, kwargs in extra or []:
        parser.add_argument(name, **kwargs)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # a relative local root means "from where the job was started"; Ray Train and Tune need
    # absolute storage paths, and workers run in other directories
    cfg.root = storage.absolute(cfg.root)
    if in_job_working_dir_copy(cfg.root):
        print(f"warning: root={cfg.root} is inside this job's copy of the uploaded working "
              "directory, which Ray may delete once the job ends; pass an absolute root or a "
              "bucket URI",
              file=sys.stderr)
    return cfg, args


def in_job_working_dir_copy(path: str) -> bool:
    """Whether ``path`` lies in a ``ray job submit --working-dir`` package Ray unpacked."""
    parts = os.path.normpath(path).split(os.sep)
    return "runtime_resources" in parts and any(p.startswith("_ray_pkg_") for p in parts)


def cluster_address(cfg: CampaignConfig) -> str | None:
    """The Ray cluster a job joins (``ray.address``, else ``RAY_ADDRESS``); None: start one."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(cfg: CampaignConfig) -> None:
    """Join the configured cluster (``ray.address`` or ``RAY_ADDRESS``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONPATH": _repo_pythonpath(), **RAY_ENV}}
    for key, value in RAY_ENV.items():  # a local instance started below inherits these too
        os.environ.setdefault(key, value)
    address = cluster_address(cfg)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local" always starts a fresh instance (a stale /tmp/ray cluster file would
        # make a plain ray.init(num_cpus=...) fail)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env=runtime_env)


def _repo_pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + existing if existing else "")
