"""The main job: every expert (and the router) as independent Ray Train runs.

Local demo (starts a local Ray instance):
    python jobs/train_all_experts.py
    python jobs/train_all_experts.py experts.ddpm_clusters=[0,3] experts.train.steps=3000
On a running Ray cluster:
    ray job submit --working-dir . -- python jobs/train_all_experts.py --config jobs/configs/demo.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdd_ray.cli import parse_job_args  # noqa: E402
from hdd_ray.config import resolve_experts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; returns the process exit status."""
    cfg, _ = parse_job_args(__doc__, argv)
    print(f"campaign {cfg.name!r} at {cfg.root}: {cfg.clustering.k} experts")
    for e in resolve_experts(cfg):
        print(f"  cluster {e.cluster}: {e.objective:<12} {e.schedule or '':<7} {e.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
